"""Router registry: `build_router(name, d_model, num_experts, **options)`.

Registered names: smoe, smoe_dropout, hyperrouter, dense.
"""

from hyperrouter.routers import dense, hyper, linear  # noqa: F401  (registers the routers)
from hyperrouter.routers.base import (
    ROUTERS,
    Router,
    Routing,
    build_router,
    register_router,
    router_options,
    topk_softmax,
)

__all__ = [
    "ROUTERS",
    "Router",
    "Routing",
    "build_router",
    "register_router",
    "router_options",
    "topk_softmax",
]
