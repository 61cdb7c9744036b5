"""The sparse MoE layer, its expert backends, top-k schedules and auxiliary losses."""

from hyperrouter.moe.experts import BACKENDS, Experts, choose_backend
from hyperrouter.moe.layer import MoE, MoEOutput, RoutingStats

__all__ = ["BACKENDS", "Experts", "MoE", "MoEOutput", "RoutingStats", "choose_backend"]
