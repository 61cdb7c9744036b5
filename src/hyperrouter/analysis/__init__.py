"""Routing statistics, run analysis, router comparisons (sweeps), tables and plots."""
