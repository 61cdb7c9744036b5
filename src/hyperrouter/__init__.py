"""hyperrouter: sparse Mixture-of-Experts with trained, frozen or hypernetwork-generated routers.

>>> import torch, hyperrouter
>>> layer = hyperrouter.MoE(d_model=64, num_experts=8, d_hidden=128, top_k=2, router="hyperrouter")
>>> out = layer(torch.randn(4, 10, 64), return_details=True)
>>> out.output.shape, sorted(out.aux_losses), out.stats.top_k
(torch.Size([4, 10, 64]), [], 2)
"""

from hyperrouter.errors import HyperRouterError
from hyperrouter.moe import MoE, MoEOutput, RoutingStats
from hyperrouter.params import ParameterSummary, parameter_summary
from hyperrouter.routers import ROUTERS, Router, Routing, build_router

__version__ = "0.1.0"

__all__ = [
    "ROUTERS",
    "HyperRouterError",
    "MoE",
    "MoEOutput",
    "ParameterSummary",
    "Router",
    "Routing",
    "RoutingStats",
    "build_router",
    "parameter_summary",
]
