"""`hyperrouter serve`: an inference server whose load controller chooses k (see app.py)."""
