"""The router interface (v2), the routing result, and the registry that builds routers by name.

A router maps the routed tokens x_TD and a `RoutingContext` (this call's k, training or not, the
optimizer step, token and sequence ids when the model has them) to a `Routing`: which K experts each
token uses and with what combine weights, optionally which (token, slot) pairs it drops, the
log-probability of sampled choices, the logits over all E experts (absent for routers without
scores), and this call's auxiliary losses. Routers know nothing about models or expert computation.

A router may also ask, per call, to see every expert's output before routing
(`wants_expert_responses` / `route_by_responses`: competition routers such as CompeteSMoE); the
layer then runs all experts on all tokens (E times the compute, on those calls only).

Two hooks let a router learn from more than its forward:
- `token_loss_terms(routing, token_loss_T)`: extra losses from the per-token task loss of the batch,
  called by the training step after the model's forward (policy-gradient routers such as RL-R);
- `optimizer_step(load_E, step)`: called once per optimizer step in training, after gradient
  accumulation, with the expert load summed since the previous call (aux-loss-free bias, codebook
  EMA, stage switches). Never called in evaluation.
The layer only does the bookkeeping for a hook when the router overrides it, so routers that use
neither cost nothing extra.

Every router with logits (`LogitRouter`) shares the score function, the Switch balance loss and the
router z-loss as options (`score`, `renormalize`, `balance_loss_weight`, `z_loss_weight`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hyperrouter.errors import HyperRouterError
from hyperrouter.routers.losses import at_least_fp32, router_z_loss, switch_balance_loss

SCORE_FUNCTIONS = ("topk_softmax", "softmax_topk", "sigmoid")


@dataclass
class RoutingContext:
    """What a router may know about a call besides the tokens.

    top_k: experts per token for this call. training: the layer's mode. step: the optimizer step
    (None outside the trainer). token_ids / sequence_ids: [T] ids of the routed tokens and of the
    sequence each belongs to (None when the model has none; padding already removed, like x_TD).
    logit_residual: [T, E] added to a logit router's logits before it chooses (MoE++'s gating
    residual: the layer's map of the previous MoE layer's logits; None: nothing added).
    """

    top_k: int
    training: bool = False
    step: int | None = None
    token_ids: Tensor | None = None
    sequence_ids: Tensor | None = None
    logit_residual: Tensor | None = None


@dataclass
class Routing:
    """A router's choice for T tokens.

    expert_ids [T, K] and weights [T, K]: each token's experts and combine weights. logits [T, E]:
    the scores over all experts (None for routers without scores; statistics then skip entropy).
    aux_losses: this call's already-weighted auxiliary losses. keep [T, K] bool: pairs the router
    keeps (None = all; the layer combines it with the capacity limit). log_probs [T, K]: the
    log-probability of sampled choices (policy-gradient routers). stats: detached per-call
    diagnostics (scalars, never added to the loss; e.g. LocMoE's off-node share), which the layer
    reports in `RoutingStats.extra`, the trainer in metrics.jsonl and `analyze` per layer.
    saved: tensors with a graph that the router's after-forward hook (`token_loss_terms`) uses;
    they travel in the model's output, so that what the hook's losses depend on stays visible to
    whoever holds the output (a data-parallel wrapper's search for unused parameters, too).
    """

    expert_ids: Tensor
    weights: Tensor
    logits: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    keep: Tensor | None = None
    log_probs: Tensor | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)
    saved: dict[str, Tensor] = field(default_factory=dict)


def topk_softmax(logits_TE: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Top-k over the raw logits, then softmax over the k selected logits only (the reference rule).

    With k = E this is the full softmax. Unsorted like the reference, so results match it
    bit for bit. At k = 1 the weight is always 1, so the router gets no gradient from the output.
    """
    values_TK, ids_TK = torch.topk(at_least_fp32(logits_TE), top_k, dim=-1, sorted=False)
    return ids_TK, torch.softmax(values_TK, dim=-1)


def fp32_linear(layer: nn.Linear, x_TD: Tensor) -> Tensor:
    """layer(x) computed in fp32 (fp64 for fp64 inputs) even under autocast: router scores in
    full precision whatever the model's dtype (the Switch paper's selective precision)."""
    dtype = torch.promote_types(x_TD.dtype, torch.float32)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    with torch.autocast(x_TD.device.type, enabled=False):
        return F.linear(x_TD.to(dtype), layer.weight.to(dtype), bias)


def select_experts(
    logits_TE: Tensor,
    top_k: int,
    score: str = "topk_softmax",
    renormalize: bool = False,
    selection_bias_E: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Experts and combine weights under a score function.

    - `topk_softmax`: top-k of the logits, softmax over the k (the reference; `renormalize` moot);
    - `softmax_topk`: p = softmax over all E, top-k of p, weights p (Switch, GShard); with
      `renormalize` divided by their sum (Mixtral; then equal to topk_softmax);
    - `sigmoid`: s = sigmoid(logits), top-k of s, weights s, optionally renormalised (DeepSeek-V3).
    `selection_bias_E` is added to the scores for the choice only, never to the weights
    (auxiliary-loss-free balancing).
    """
    if score == "topk_softmax" and selection_bias_E is None:
        return topk_softmax(logits_TE, top_k)
    logits_TE = at_least_fp32(logits_TE)
    if score == "topk_softmax":
        scores_TE = logits_TE
    elif score == "softmax_topk":
        scores_TE = torch.softmax(logits_TE, dim=-1)
    elif score == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
    else:
        raise HyperRouterError(f"unknown score {score!r}; valid: {', '.join(SCORE_FUNCTIONS)}")
    choice_TE = scores_TE if selection_bias_E is None else scores_TE + selection_bias_E
    ids_TK = torch.topk(choice_TE.detach(), top_k, dim=-1, sorted=False).indices
    values_TK = scores_TE.gather(1, ids_TK)
    if score == "topk_softmax":
        return ids_TK, torch.softmax(values_TK, dim=-1)
    if renormalize:
        if top_k == 1:  # s / s is 1, but its rounding noise would reach the router's gradient
            return ids_TK, torch.ones_like(values_TK)
        values_TK = values_TK / values_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    return ids_TK, values_TK


class Router(nn.Module):
    """Base of every router: `forward(x_TD, ctx) -> Routing`; see the module docstring."""

    uses_all_experts: ClassVar[bool] = False
    registry_name: ClassVar[str] = ""
    # a dispatch strategy the router's routing must be computed with (None: the layer's choice);
    # e.g. "merge" for routers whose weights average the experts' parameters (SMEAR)
    dispatch: ClassVar[str | None] = None

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.num_experts = num_experts

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        raise NotImplementedError

    def context(self, ctx: RoutingContext | int) -> RoutingContext:
        """Accept a bare k (the v1 call `router(x, k)`) as well as a full context."""
        if isinstance(ctx, RoutingContext):
            return ctx
        return RoutingContext(top_k=int(ctx), training=self.training)

    # ---------------------------------------------------------------- hooks (no-ops by default)
    def token_loss_terms(self, routing: Routing, token_loss_T: Tensor) -> dict[str, Tensor]:
        """Extra (weighted) losses from the per-token task loss [T] of the tokens just routed."""
        return {}

    def optimizer_step(self, load_E: Tensor, step: int) -> None:
        """Update state once per optimizer step from the load [E] since the previous step,
        summed over every data-parallel rank (the training step sums it before calling)."""

    def fit_token_counts(self, counts_V: Tensor) -> None:
        """Called once before training from scratch with the count of every token id in the
        training data (routers built from corpus statistics, e.g. a balanced hash table)."""

    @property
    def wants_token_counts(self) -> bool:
        return type(self).fit_token_counts is not Router.fit_token_counts

    def wants_expert_responses(self, ctx: RoutingContext) -> bool:
        """True when this call should route by the experts' responses (competition routers):
        the layer then runs every expert on every token and calls `route_by_responses`."""
        return False

    def route_by_responses(
        self, x_TD: Tensor, ctx: RoutingContext, responses_TED: Tensor
    ) -> Routing:
        """Route from every expert's output on every token (detached, [T, E, d_model])."""
        raise NotImplementedError

    @property
    def wants_token_loss(self) -> bool:
        return type(self).token_loss_terms is not Router.token_loss_terms

    @property
    def wants_optimizer_step(self) -> bool:
        return type(self).optimizer_step is not Router.optimizer_step

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}"


class LogitRouter(Router):
    """A router that scores every expert (`compute_logits` -> [T, E]) and takes the top k under
    its score function, with the optional Switch balance loss and router z-loss.

    Options shared by every logit router: `score` (topk_softmax | softmax_topk | sigmoid, see
    `select_experts`), `renormalize` (for softmax_topk and sigmoid), `balance_loss_weight` and
    `z_loss_weight` (0 = off).
    """

    # whether forward chooses from `scores` (so the layer's gating residual reaches the choice);
    # a subclass whose forward computes its logits otherwise sets it False
    takes_logit_residual: ClassVar[bool] = True

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        score: str = "topk_softmax",
        renormalize: bool = False,
        balance_loss_weight: float = 0.0,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts)
        if score not in SCORE_FUNCTIONS:
            raise HyperRouterError(f"unknown score {score!r}; valid: {', '.join(SCORE_FUNCTIONS)}")
        for name, value in (
            ("balance_loss_weight", balance_loss_weight),
            ("z_loss_weight", z_loss_weight),
        ):
            if not isinstance(value, (int, float)) or value < 0:
                raise HyperRouterError(f"{name} must be a number >= 0, got {value!r}")
        self.score = score
        self.renormalize = bool(renormalize)
        self.balance_loss_weight = float(balance_loss_weight)
        self.z_loss_weight = float(z_loss_weight)

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        raise NotImplementedError

    def scores(self, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        """The logits the router chooses from: `compute_logits`, plus the call's gating residual
        (`RoutingContext.logit_residual`, in fp32) when the layer gives one."""
        logits_TE = self.compute_logits(x_TD)
        if ctx.logit_residual is None:
            return logits_TE
        return at_least_fp32(logits_TE) + ctx.logit_residual

    def selection_bias(self) -> Tensor | None:
        """A per-expert bias added to the scores for the choice only (None: no bias)."""
        return None

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        logits_TE = self.scores(x_TD, ctx)
        ids_TK, weights_TK = select_experts(
            logits_TE, ctx.top_k, self.score, self.renormalize, self.selection_bias()
        )
        return Routing(ids_TK, weights_TK, logits_TE, self.aux_losses(logits_TE, ids_TK))

    def aux_losses(self, logits_TE: Tensor, ids_TK: Tensor) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        if self.balance_loss_weight > 0 and ids_TK.numel() > 0:
            losses["balance_loss"] = self.balance_loss_weight * switch_balance_loss(
                logits_TE, ids_TK
            )
        if self.z_loss_weight > 0 and logits_TE.numel() > 0:
            losses["z_loss"] = self.z_loss_weight * router_z_loss(logits_TE)
        return losses


ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator adding a router to the registry under `name`."""

    def wrap(cls: type[Router]) -> type[Router]:
        if name in ROUTERS:
            raise ValueError(f"router {name!r} is already registered")
        ROUTERS[name] = cls
        cls.registry_name = name
        return cls

    return wrap


def router_option_defaults(name: str) -> dict[str, Any]:
    """Keyword options the router `name` accepts (besides d_model and num_experts), with defaults.

    Collected along the class hierarchy for as long as each __init__ forwards **options to its
    parent, so options shared by a family (e.g. every logit router's `score`) are listed once.
    """
    cls = _router_class(name)
    options: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in options:
                options[p.name] = p.default
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return options


def router_options(name: str) -> list[str]:
    """Names of the keyword options the router `name` accepts."""
    return list(router_option_defaults(name))


def build_router(name: str, d_model: int, num_experts: int, **options: object) -> Router:
    """Build a registered router, rejecting unknown names and options with a one-line error."""
    cls = _router_class(name)
    valid = router_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise HyperRouterError(
            f"unknown option(s) {', '.join(unknown)} for router {name!r}; "
            f"valid: {', '.join(valid) or 'none'}"
        )
    return cls(d_model, num_experts, **options)


def _router_class(name: str) -> type[Router]:
    if name not in ROUTERS:
        raise HyperRouterError(f"unknown router {name!r}; valid: {', '.join(sorted(ROUTERS))}")
    return ROUTERS[name]


def init_linear_(layer: nn.Linear, std: float) -> None:
    """Transformer-XL initialisation: weight N(0, std), bias 0."""
    nn.init.normal_(layer.weight, 0.0, std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def freeze_(module: nn.Module) -> nn.Module:
    """Mark every parameter of `module` frozen (requires_grad False); still saved and loaded."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def check_option(name: str, value: Any, ok: bool, valid: str) -> None:
    """One-line error for a bad router option: its name, the value and the valid range."""
    if not ok:
        raise HyperRouterError(f"router option {name} must be {valid}, got {value!r}")
