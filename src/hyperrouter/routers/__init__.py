"""Router registry: `build_router(name, d_model, num_experts, **options)`.

Every router module registers itself on import; `ROUTERS` maps names to classes.
"""

from hyperrouter.routers import (  # noqa: F401  (registers the routers)
    aux_free,
    base_layers,
    competesmoe,
    cosine,
    dense,
    expert_choice,
    hash,
    hyper,
    linear,
    locmoe,
    null_experts,
    remoe,
    rlr,
    sbase,
    sigmoid,
    smear,
    stablemoe,
    switch,
    tc_moe,
    top_p,
    vqmoe,
    xmoe,
)
from hyperrouter.routers.base import (
    ROUTERS,
    SCORE_FUNCTIONS,
    LogitRouter,
    Router,
    Routing,
    RoutingContext,
    build_router,
    register_router,
    router_option_defaults,
    router_options,
    select_experts,
    topk_softmax,
)

__all__ = [
    "ROUTERS",
    "SCORE_FUNCTIONS",
    "LogitRouter",
    "Router",
    "Routing",
    "RoutingContext",
    "build_router",
    "register_router",
    "router_option_defaults",
    "router_options",
    "select_experts",
    "topk_softmax",
]
