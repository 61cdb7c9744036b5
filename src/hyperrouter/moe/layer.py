"""`MoE`: a drop-in replacement for a Transformer FFN (router -> dispatch -> experts -> combine).

The router decides (`hyperrouter.routers`), the layer's dispatcher object moves tokens to experts
and back (`hyperrouter.moe.dispatch`: token dispatch through the expert backends, or parameter
merging), the experts compute (`hyperrouter.moe.experts`). Optional shared experts form an extra
path every token takes, added to the routed output or mixed with it by a learned gate; an
optional second router routes the same experts again through the same dispatcher. Expert
parallelism (`hyperrouter.moe.expert_parallel`) gives a layer another dispatcher; nothing else
about the layer changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch import distributed as dist

from hyperrouter.errors import HyperRouterError
from hyperrouter.moe.dispatch import LocalDispatcher, Routed, check_dispatch
from hyperrouter.moe.experts import (
    BACKENDS,
    Experts,
    ExpertWeights,
    choose_backend,
    dense_backend,
)
from hyperrouter.moe.policies import TokenPolicy, apply_policy
from hyperrouter.moe.zero_computation import ZeroComputationExperts
from hyperrouter.routers import LogitRouter, Router, Routing, RoutingContext, build_router
from hyperrouter.routers.base import fp32_linear
from hyperrouter.routers.losses import at_least_fp32

SHARED_MIXES = ("sum", "gate")


@dataclass
class RoutingStats:
    """Routing statistics of one call (detached tensors; call .item()/.tolist() when needed).

    tokens_per_expert: [E] (token, slot) assignments each expert computed (after dropping);
    entropy: mean over tokens of the entropy (nats) of the full router softmax over all E experts
    (None for routers without logits); dropped_fraction: the share of the call's T * k
    assignments that no expert computed (dropped by the router or the capacity limit; 0 when
    every token got its k; under a token policy, of the pairs the policy kept); backend: the
    expert backend that ran; top_k: the k used (a token policy's k_max); extra: the router's own
    per-call diagnostics (`Routing.stats`); mean_k: experts computed per token (kept pairs / T;
    below top_k under a token policy, a capacity limit or a router that drops).
    """

    tokens_per_expert: Tensor
    entropy: Tensor | None
    dropped_fraction: Tensor
    backend: str
    top_k: int
    extra: dict[str, Tensor] = field(default_factory=dict)
    mean_k: Tensor | None = None


class MoEOutput:
    """Everything one MoE call produced: output [..., d_model], this call's auxiliary losses
    (already weighted; empty when the router has none), routing statistics, and the routing the
    layer really did (`routing.keep` is the final keep mask: the router's and the capacity's).

    The statistics are computed the first time `stats` is read (an evaluation that never reads
    them does not pay for them: the entropy over all E scores, the bincount). `computed_pairs`
    (the (token, FFN expert) pairs the experts computed, a 0-d tensor) is cheap on its own."""

    __slots__ = ("output", "aux_losses", "routing", "_stats", "_make_stats", "ffn_experts")

    def __init__(
        self,
        output: Tensor,
        aux_losses: dict[str, Tensor] | None = None,
        stats: RoutingStats | None = None,
        routing: Routing | None = None,
        make_stats: Any = None,
        ffn_experts: int | None = None,
    ) -> None:
        self.output = output
        self.ffn_experts = ffn_experts
        self.aux_losses = {} if aux_losses is None else aux_losses
        self.routing = routing
        self._stats = stats
        self._make_stats = make_stats

    @property
    def stats(self) -> RoutingStats | None:
        if self._stats is None and self._make_stats is not None:
            self._stats, self._make_stats = self._make_stats(), None
        return self._stats

    @property
    def computed_pairs(self) -> Tensor:
        """The (token, FFN expert) pairs the call computed (slots on zero-computation experts,
        dropped and unkept slots excluded); with `routed_tokens`, the call's mean k."""
        ids, keep = self.routing.expert_ids, self.routing.keep
        computed = torch.ones_like(ids, dtype=torch.bool) if keep is None else keep
        if self.ffn_experts is not None:
            computed = computed & (ids < self.ffn_experts)
        return computed.sum()

    @property
    def routed_tokens(self) -> int:
        return self.routing.expert_ids.shape[0]

    def __repr__(self) -> str:
        return f"MoEOutput(output={tuple(self.output.shape)}, aux_losses={sorted(self.aux_losses)})"


class MoE(nn.Module):
    """Sparse Mixture-of-Experts FFN: input [..., d_model] -> output of the same shape.

    Args:
        d_model: model width. num_experts: E. d_hidden: hidden width of each expert.
        top_k: experts per token (1 <= k <= E); change it any time (`layer.top_k = 4`) or per call.
        router: registered router name (`hyperrouter.routers.ROUTERS`); router_options: its options.
        activation: relu (Transformer-XL default), gelu, gelu_tanh (GPT-2's) or swiglu. bias:
            expert biases.
        dropout: dropout on the expert hidden activations (as in the reference experts).
        backend: auto | reference | grouped | grouped_mm | dense (see hyperrouter.moe.experts).
        capacity_factor: None (default) drops no token; a float c caps each expert at
            ceil(T * k / E * c) assignments, every token's first choice before anyone's second
            (GShard/Switch order); dropped pairs contribute 0 (the block's residual carries x).
        granularity: DeepSeekMoE fine-grained segmentation: each of the E experts is split into
            m experts of d_hidden / m, so the layer has E * m experts; top_k counts these finer
            experts (use k * m for the compute of k unsplit experts).
        shared_experts: DeepSeekMoE shared experts (of width shared_d_hidden, default d_hidden)
            that every token uses, outside the routing. shared_mix: "sum" adds their output to the
            routed one (DeepSeekMoE); "gate" mixes the two with a learned per-token 2-way softmax.
        dispatch: the dispatch strategy, `tokens` or `merge` (`hyperrouter.moe.dispatch`); a
            router may require one. Where the experts live is the layer's `dispatcher` object
            (`LocalDispatcher`; expert parallelism gives it another, `shard_experts`).
        second_router: a second routing of the same experts (its name; second_router_options
            its options; second_top_k its k), whose output is mixed with the first path's by a
            learned per-token 2-way softmax gate, y = g_0 y_routed + g_1 y_second, in training
            and in inference (VQMoE's layer: `second_router="vqmoe"`). Its auxiliary losses join
            the layer's (a name the first router also uses gets the prefix `second_`).

        constant_experts, copy_experts, zero_experts: MoE++'s zero-computation experts
            (`hyperrouter.moe.zero_computation`) beside the FFN experts: the router chooses among
            num_experts * granularity + their count (`num_experts` is that total; the FFN experts
            are `ffn_experts`); with any, the heterogeneous balance loss
            `zc_balance_loss` (weight zc_balance_loss_weight, paper 0.01; tau = zc_tau, paper 0.75)
            joins the router's own losses (routers with logits only).
        gating_residual: MoE++'s gating residual: the router's logits get W_g times the previous
            MoE layer's logits (W_g [E, E], no bias; the model passes `previous_logits`); the first
            MoE layer, or a call without them, adds nothing. Needs a logit router that chooses
            from its `scores`.

    `token_policy` (default None, static k): a per-token choice of k (`hyperrouter.moe.policies`:
    top-p, weight-ratio skipping); with one set, the layer routes every token to the policy's
    k_max experts and computes only the prefix the policy keeps.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        d_hidden: int,
        top_k: int = 2,
        *,
        router: str = "smoe",
        router_options: dict | None = None,
        activation: str = "relu",
        bias: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
        capacity_factor: float | None = None,
        init_std: float = 0.02,
        granularity: int = 1,
        shared_experts: int = 0,
        shared_d_hidden: int | None = None,
        shared_mix: str = "sum",
        dispatch: str = "tokens",
        second_router: str | None = None,
        second_router_options: dict | None = None,
        second_top_k: int = 1,
        constant_experts: int = 0,
        copy_experts: int = 0,
        zero_experts: int = 0,
        gating_residual: bool = False,
        zc_balance_loss_weight: float = 0.01,
        zc_tau: float = 0.75,
    ) -> None:
        super().__init__()
        for name, value in (
            ("d_model", d_model),
            ("num_experts", num_experts),
            ("d_hidden", d_hidden),
            ("granularity", granularity),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HyperRouterError(f"{name} must be a positive integer, got {value!r}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise HyperRouterError(
                f"capacity_factor must be > 0 (or None for no limit), got {capacity_factor}"
            )
        if d_hidden % granularity:
            raise HyperRouterError(
                f"granularity must divide d_hidden={d_hidden}, got {granularity}"
            )
        if isinstance(shared_experts, bool) or not isinstance(shared_experts, int):
            raise HyperRouterError(f"shared_experts must be an integer, got {shared_experts!r}")
        if not 0 <= shared_experts <= num_experts:
            raise HyperRouterError(
                f"shared_experts must be in [0, num_experts={num_experts}], got {shared_experts}"
            )
        if shared_mix not in SHARED_MIXES:
            raise HyperRouterError(
                f"unknown shared_mix {shared_mix!r}; valid: {', '.join(SHARED_MIXES)}"
            )
        self.dispatch = check_dispatch(dispatch)
        self.dispatcher = LocalDispatcher()
        self.d_model = d_model
        self.granularity = granularity
        ffn_experts = num_experts * granularity
        self.zero_computation = None
        if constant_experts or copy_experts or zero_experts:
            self.zero_computation = ZeroComputationExperts(
                d_model, ffn_experts, constant_experts, copy_experts, zero_experts
            )
        zc = 0 if self.zero_computation is None else self.zero_computation.num_experts
        # the router's choices: the FFN experts (all of them, wherever they live) and the
        # zero-computation experts
        self.ffn_experts = ffn_experts
        self.num_experts = ffn_experts + zc
        for name, value in (("zc_balance_loss_weight", zc_balance_loss_weight), ("zc_tau", zc_tau)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise HyperRouterError(f"{name} must be a number >= 0, got {value!r}")
        self.zc_balance_loss_weight = float(zc_balance_loss_weight)
        self.zc_tau = float(zc_tau)
        self.capacity_factor = capacity_factor
        self.router = build_router(router, d_model, self.num_experts, **(router_options or {}))
        self.router_name = router
        self.gate_map = None
        if gating_residual:
            if not (isinstance(self.router, LogitRouter) and self.router.takes_logit_residual):
                raise HyperRouterError(
                    f"gating_residual needs a logit router that chooses from its scores; "
                    f"router {router!r} does not"
                )
            self.gate_map = nn.Linear(self.num_experts, self.num_experts, bias=False)
        if zc and (
            self.router.uses_all_experts
            or (self.router.dispatch or dispatch) == "merge"
            or type(self.router).wants_expert_responses is not Router.wants_expert_responses
            or second_router is not None
        ):
            raise HyperRouterError(
                f"zero-computation experts need a router that picks experts per token from the "
                f"FFN and zero-computation experts alike, with the tokens dispatch and no second "
                f"router; router {router!r} with these options does not"
            )
        self.experts = Experts(
            ffn_experts,
            d_model,
            d_hidden // granularity,
            activation=activation,
            bias=bias,
            dropout=dropout,
            init_std=init_std,
        )
        self.shared = None
        self.shared_gate = None
        self.shared_mix = shared_mix
        if shared_experts:
            self.shared = Experts(
                shared_experts,
                d_model,
                shared_d_hidden or d_hidden,
                activation=activation,
                bias=bias,
                dropout=dropout,
                init_std=init_std,
            )
            if shared_mix == "gate":
                self.shared_gate = nn.Linear(d_model, 2)
                nn.init.normal_(self.shared_gate.weight, 0.0, init_std)
                nn.init.zeros_(self.shared_gate.bias)
        self.second_router = None
        self.path_gate = None
        if second_router is not None:
            self.second_router = build_router(
                second_router, d_model, self.num_experts, **(second_router_options or {})
            )
            if isinstance(second_top_k, bool) or not isinstance(second_top_k, int):
                raise HyperRouterError(f"second_top_k must be an integer, got {second_top_k!r}")
            if not 1 <= second_top_k <= self.num_experts:
                raise HyperRouterError(
                    f"second_top_k must be in [1, {self.num_experts}], got {second_top_k}"
                )
            self.path_gate = nn.Linear(d_model, 2)
            nn.init.normal_(self.path_gate.weight, 0.0, init_std)
            nn.init.zeros_(self.path_gate.bias)
        self.second_top_k = second_top_k
        self.top_k = top_k
        self.token_policy = None
        self.backend = backend
        self.step: int | None = None  # the optimizer step, set by the training step
        self.register_buffer("load_since_step", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer(
            "second_load_since_step", torch.zeros(0, dtype=torch.long), persistent=False
        )
        self._awaiting_token_loss: tuple[Routing, Tensor | None] | None = None
        self._second_awaiting: tuple[Routing, Tensor | None] | None = None

    @property
    def top_k(self) -> int:
        return self._top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        self._top_k = self._check_top_k(value)

    @property
    def token_policy(self) -> TokenPolicy | None:
        return self._token_policy

    @token_policy.setter
    def token_policy(self, policy: TokenPolicy | None) -> None:
        if policy is not None:
            if not isinstance(policy, TokenPolicy):
                raise HyperRouterError(
                    f"token_policy must be a TokenPolicy or None, got {policy!r}"
                )
            if self.router.uses_all_experts or (self.router.dispatch or self.dispatch) == "merge":
                raise HyperRouterError(
                    f"router {self.router_name!r} uses every expert on every token: a per-token "
                    f"policy has no slots to choose from"
                )
        self._token_policy = policy

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = _check_backend(value)

    @property
    def shard(self) -> Any:
        """Where this layer's experts live (`ExpertShard`), None when all are here."""
        return self.dispatcher.shard

    def extra_repr(self) -> str:
        extra = f", shared={self.shared.num_experts}" if self.shared is not None else ""
        shard = self.shard
        if shard is not None:
            last = shard.first + shard.count - 1
            extra += f", expert_parallel={shard.size} (experts {shard.first}..{last} here)"
        return f"router={self.router_name}, top_k={self.top_k}, backend={self.backend}{extra}"

    def _check_top_k(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise HyperRouterError(
                f"top_k must be an integer in [1, {self.num_experts}], got {value!r}"
            )
        if not 1 <= value <= self.num_experts:
            raise HyperRouterError(f"top_k must be in [1, {self.num_experts}], got {value}")
        return value

    # ---------------------------------------------------------------- training hooks
    @property
    def routers(self) -> list[Router]:
        """The layer's routers: the first path's, and the second path's when there is one."""
        return [r for r in (self.router, self.second_router) if r is not None]

    def token_loss_terms(self, token_loss: Tensor) -> dict[str, Tensor]:
        """The router's extra losses from the per-token task loss of the last training forward.

        `token_loss` has the shape of that forward's input without its last dimension (padding
        included; it is removed here like it was for routing). Empty for routers without the hook.
        """
        terms: dict[str, Tensor] = {}
        for router, attr in (
            (self.router, "_awaiting_token_loss"),
            (self.second_router, "_second_awaiting"),
        ):
            pending = getattr(self, attr)
            setattr(self, attr, None)
            if pending is None:
                continue
            routing, token_idx = pending
            loss_T = token_loss.reshape(-1)
            if token_idx is not None:
                loss_T = loss_T.index_select(0, token_idx)
            for name, value in router.token_loss_terms(routing, loss_T.detach()).items():
                terms[f"second_{name}" if name in terms else name] = value
        return terms

    def optimizer_step(self, step: int) -> None:
        """Called once per optimizer step in training: the router sees the load since the last
        (over every rank once `sum_loads_over_ranks` ran, as the training step does)."""
        for router, attr in (
            (self.router, "load_since_step"),
            (self.second_router, "second_load_since_step"),
        ):
            if router is None or not router.wants_optimizer_step:
                continue
            load = getattr(self, attr)
            if load.numel() == 0:
                load = torch.zeros(self.num_experts, dtype=torch.long, device=load.device)
            router.optimizer_step(load, step)
        self.load_since_step = self.load_since_step.new_zeros(0)
        self.second_load_since_step = self.second_load_since_step.new_zeros(0)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        x: Tensor,
        top_k: int | None = None,
        *,
        mask: Tensor | None = None,
        backend: str | None = None,
        return_details: bool = False,
        token_ids: Tensor | None = None,
        sequence_ids: Tensor | None = None,
        previous_logits: Tensor | None = None,
    ) -> Tensor | MoEOutput:
        """Route and compute. Returns the output tensor, or a `MoEOutput` with return_details=True.

        `mask` (bool, x.shape[:-1]) marks real tokens: padding is not routed, not computed, adds
        nothing to the auxiliary losses or statistics, and gets output 0. `token_ids` and
        `sequence_ids` (x.shape[:-1]) reach the router through its `RoutingContext`.
        `previous_logits` ([T, E] over the real tokens: the previous MoE layer's
        `MoEOutput.routing.logits`) feeds the gating residual; ignored without one.
        """
        self._check_input(x)
        k = self.top_k if top_k is None else self._check_top_k(top_k)
        policy = self.token_policy
        if policy is not None:
            k = policy.slots(self.num_experts)
        backend = self.backend if backend is None else _check_backend(backend)
        if self.router.uses_all_experts:
            k = self.num_experts
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        compute_dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        lead = x.shape[:-1]
        x_TD, token_idx = self._real_tokens(x, mask)
        ctx = RoutingContext(
            top_k=k,
            training=self.training,
            step=self.step,
            token_ids=self._per_token(token_ids, "token_ids", lead, token_idx),
            sequence_ids=self._per_token(sequence_ids, "sequence_ids", lead, token_idx),
        )

        with router_precision(x_TD, autocast) as x_router:
            ctx.logit_residual = self._logit_residual(previous_logits, x_router)
            routing = self._route(x_router, ctx)
            policy_keep = None
            if policy is not None:
                routing.keep, routing.weights = apply_policy(
                    policy, routing.logits, routing.expert_ids, routing.weights, routing.keep
                )
                policy_keep = routing.keep
        zc = self.zero_computation
        ffn_routing = routing if zc is None else _ffn_part(routing, zc.first)
        routed = self._plan(x_TD, ffn_routing, k, backend, compute_dtype, autocast)
        keep_TK = routed.keep_TK if zc is None else _with_zc_slots(routing, routed.keep_TK, zc)
        second = None
        if x_TD.shape[0] == 0 and not self.dispatcher.collective:
            y_TD = self._empty_output(x_TD, compute_dtype)
        else:
            y_TD = self.dispatcher.run(self.router.dispatch or self.dispatch, self.experts, routed)
            if zc is not None:
                y_TD = y_TD + zc(x_TD.to(y_TD.dtype), routing.expert_ids, routing.weights, keep_TK)
            if self.second_router is not None:
                y_TD, second = self._second_path(routed, y_TD, ctx, backend)
            if self.shared is not None:
                y_TD = self._mix_shared(x_TD, y_TD, compute_dtype, autocast)
            if x_TD.shape[0] == 0:  # collective, no tokens: every parameter still gets a gradient
                y_TD = y_TD + self._empty_output(x_TD, compute_dtype)
        if token_idx is not None:
            y_TD = y_TD.new_zeros(lead.numel(), self.d_model).index_copy(0, token_idx, y_TD)
        output = y_TD.view(*lead, self.d_model)

        aux_losses = self._aux_losses(routing, second)
        if zc is not None and self.zc_balance_loss_weight > 0 and routing.logits is not None:
            if routing.expert_ids.shape[0] > 0:
                aux_losses = dict(aux_losses)
                aux_losses["zc_balance_loss"] = self.zc_balance_loss_weight * zc.balance_loss(
                    routing.logits, routing.expert_ids, keep_TK, self.zc_tau
                )
        if self.training:
            self._training_bookkeeping(routing, keep_TK, token_idx)
            if second is not None:
                self._second_bookkeeping(second, token_idx)
        if not return_details:
            return output
        routing.keep = keep_TK
        wanted = None if policy_keep is None else policy_keep.sum()

        def make_stats() -> RoutingStats:
            stats = _routing_stats(
                routing,
                keep_TK,
                self.num_experts,
                routed.backend,
                k,
                None if wanted is None else int(wanted),
                ffn_experts=self.ffn_experts if zc is not None else None,
            )
            if zc is not None:
                stats.extra.update(zc.shares(routing.expert_ids, keep_TK))
            return stats

        return MoEOutput(
            output,
            aux_losses,
            routing=routing,
            make_stats=make_stats,
            ffn_experts=self.ffn_experts if zc is not None else None,
        )

    def _logit_residual(self, previous_logits: Tensor | None, x_TD: Tensor) -> Tensor | None:
        """W_g times the previous MoE layer's logits (MoE++'s gating residual), in fp32; None
        without a gating residual or previous logits."""
        if self.gate_map is None or previous_logits is None:
            return None
        if previous_logits.shape != (x_TD.shape[0], self.num_experts):
            raise HyperRouterError(
                f"previous_logits must be [tokens, experts]=[{x_TD.shape[0]}, "
                f"{self.num_experts}] (the previous MoE layer's, over the same tokens), got "
                f"{tuple(previous_logits.shape)}"
            )
        with torch.autocast(x_TD.device.type, enabled=False):
            return fp32_linear(self.gate_map, previous_logits)

    def _real_tokens(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x as [T, d_model] rows without the padding `mask` excludes, and the kept rows' indices
        (None without a mask)."""
        x_TD = x.reshape(-1, self.d_model)
        if mask is None:
            return x_TD, None
        if mask.shape != x.shape[:-1]:
            raise HyperRouterError(
                f"mask shape must be x.shape[:-1]={tuple(x.shape[:-1])}, got {tuple(mask.shape)}"
            )
        token_idx = mask.reshape(-1).nonzero(as_tuple=True)[0]
        return x_TD.index_select(0, token_idx), token_idx

    def _route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        """The router's choice, from the experts' responses when the router asks for them (when
        any rank of an expert-parallel group competes, every rank joins the weights' gather)."""
        if type(self.router).wants_expert_responses is Router.wants_expert_responses:
            return self.router(x_TD, ctx)
        wants = x_TD.shape[0] > 0 and self.router.wants_expert_responses(ctx)
        if not self.dispatcher.any_rank(wants, x_TD.device):
            return self.router(x_TD, ctx)
        with torch.no_grad():
            weights = self.dispatcher.expert_weights(self.experts)
        if not wants:
            return self.router(x_TD, ctx)
        return self.router.route_by_responses(x_TD, ctx, self._responses(x_TD, weights))

    def _plan(
        self,
        x_TD: Tensor,
        routing: Routing,
        k: int,
        backend: str,
        compute_dtype: torch.dtype,
        autocast: bool,
    ) -> Routed:
        """What the dispatcher will carry out: the keep mask under the capacity limit (over the
        tokens the experts see) and the backend `auto` picks for this call (by the pairs kept,
        when the router, a token policy or the capacity keeps fewer than k per token, not by the
        slots: the dense backend would compute every expert)."""
        keep_TK = routing.keep
        if self.capacity_factor is not None and (x_TD.shape[0] > 0 or self.dispatcher.collective):
            keep_TK = self.dispatcher.capacity_keep(
                routing.expert_ids, keep_TK, self.ffn_experts, k, self.capacity_factor
            )
        if backend == "auto":
            slots = routing.expert_ids.shape[1]
            if keep_TK is not None:
                slots = min(slots, -(-int(keep_TK.sum()) // max(x_TD.shape[0], 1)))
            backend = choose_backend(
                x_TD.shape[0], self.ffn_experts, slots, x_TD.device, x_TD.dtype
            )
        return Routed(x_TD, routing, keep_TK, backend, compute_dtype, autocast)

    def _aux_losses(self, routing: Routing, second: Routing | None) -> dict[str, Tensor]:
        """The routers' auxiliary losses (a name both paths use gets the prefix `second_`)."""
        if second is None or routing.expert_ids.shape[0] == 0:
            return routing.aux_losses
        aux_losses = dict(routing.aux_losses)
        for name, value in second.aux_losses.items():
            aux_losses[f"second_{name}" if name in aux_losses else name] = value
        return aux_losses

    @torch.no_grad()
    def expert_responses(self, x_TD: Tensor) -> Tensor:
        """Every expert's output on every token, detached: [T, E, d_model] (E times the compute
        of one expert per token; for competition routers, on their competition calls only). Under
        expert parallelism a collective: every rank of the group must call it."""
        return self._responses(x_TD, self.dispatcher.expert_weights(self.experts))

    @torch.no_grad()
    def _responses(self, x_TD: Tensor, weights: ExpertWeights) -> Tensor:
        x = x_TD.detach()
        experts = self.experts
        return torch.stack(
            [experts.expert_forward(e, x, weights) for e in range(self.num_experts)], 1
        )

    def _second_path(
        self, first: Routed, y_TD: Tensor, ctx: RoutingContext, backend: str
    ) -> tuple[Tensor, Routing]:
        """The second routing of the same experts (through the same plan and dispatcher as the
        first: capacity limit and backend apply alike), mixed with the first by the 2-way gate."""
        x_TD, k = first.x_TD, self.second_top_k
        with router_precision(x_TD, first.autocast) as x_router:
            second = self.second_router(x_router, dataclasses.replace(ctx, top_k=k))
        routed = self._plan(x_TD, second, k, backend, first.compute_dtype, first.autocast)
        second.keep = routed.keep_TK
        y2_TD = self.dispatcher.run(self.second_router.dispatch or "tokens", self.experts, routed)
        with torch.autocast(x_TD.device.type, enabled=False):
            gate_T2 = torch.softmax(fp32_linear(self.path_gate, x_TD), dim=-1).to(y_TD.dtype)
        return gate_T2[:, :1] * y_TD + gate_T2[:, 1:] * y2_TD, second

    def _second_bookkeeping(self, second: Routing, token_idx: Tensor | None) -> None:
        router = self.second_router
        if router.wants_token_loss:
            self._second_awaiting = (second, token_idx)
        if router.wants_optimizer_step:
            with torch.no_grad():
                ids = second.expert_ids if second.keep is None else second.expert_ids[second.keep]
                counts = torch.bincount(ids.reshape(-1), minlength=self.num_experts)
                if self.second_load_since_step.numel() == 0:
                    self.second_load_since_step = counts
                else:
                    self.second_load_since_step = self.second_load_since_step + counts

    # ---------------------------------------------------------------- helpers
    def _check_input(self, x: Tensor) -> None:
        if not torch.is_floating_point(x):
            raise HyperRouterError(f"MoE input must be a floating-point tensor, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise HyperRouterError(
                f"MoE input last dimension must be d_model={self.d_model}, got shape "
                f"{tuple(x.shape)}"
            )
        param_dtype = self.experts.w_in.dtype
        if x.dtype != param_dtype and not torch.is_autocast_enabled(x.device.type):
            raise HyperRouterError(
                f"MoE input is {x.dtype} but the layer's parameters are {param_dtype}; cast one "
                f"to the other (x.to({param_dtype}) or layer.to({x.dtype})) or run under "
                f"torch.autocast"
            )

    @staticmethod
    def _per_token(
        values: Tensor | None, name: str, lead: torch.Size, token_idx: Tensor | None
    ) -> Tensor | None:
        if values is None:
            return None
        if values.shape != lead:
            raise HyperRouterError(
                f"{name} shape must be x.shape[:-1]={tuple(lead)}, got {tuple(values.shape)}"
            )
        flat = values.reshape(-1)
        return flat if token_idx is None else flat.index_select(0, token_idx)

    def _empty_output(self, x_TD: Tensor, compute_dtype: torch.dtype) -> Tensor:
        """[0, d_model] output still attached to the graph, so a loss built on an empty batch
        backpropagates like any other (zero gradients) instead of failing."""
        y = x_TD.to(compute_dtype) * 0
        for p in self.parameters():
            if p.requires_grad:
                y = y + p.sum().to(compute_dtype) * 0
        return y

    def _mix_shared(
        self, x_TD: Tensor, routed_TD: Tensor, compute_dtype: torch.dtype, autocast: bool
    ) -> Tensor:
        num_tokens, num_shared = x_TD.shape[0], self.shared.num_experts
        ids = torch.arange(num_shared, device=x_TD.device).expand(num_tokens, -1)
        ones = x_TD.new_ones(num_tokens, num_shared, dtype=compute_dtype)
        weights = self.shared.weights(compute_dtype if autocast else None)
        with torch.autocast(x_TD.device.type, enabled=False):
            shared_TD = dense_backend(self.shared, weights, x_TD.to(compute_dtype), ids, ones, None)
        if self.shared_gate is None:
            return routed_TD + shared_TD
        gate_T2 = torch.softmax(at_least_fp32(self.shared_gate(x_TD)), dim=-1).to(routed_TD.dtype)
        return gate_T2[:, :1] * routed_TD + gate_T2[:, 1:] * shared_TD

    def _training_bookkeeping(
        self, routing: Routing, keep_TK: Tensor | None, token_idx: Tensor | None
    ) -> None:
        router = self.router
        if router.wants_token_loss:
            self._awaiting_token_loss = (routing, token_idx)
        if router.wants_optimizer_step:
            with torch.no_grad():
                ids = routing.expert_ids if keep_TK is None else routing.expert_ids[keep_TK]
                counts = torch.bincount(ids.reshape(-1), minlength=self.num_experts)
                if self.load_since_step.numel() == 0:
                    self.load_since_step = counts
                else:
                    self.load_since_step = self.load_since_step + counts


@contextlib.contextmanager
def router_precision(x_TD: Tensor, autocast: bool) -> Iterator[Tensor]:
    """Routers compute in full precision (the Switch paper's selective precision), every one of
    them, here rather than in each router: under autocast the router sees x in fp32 (fp64 stays
    fp64) with autocast off, so its scores, top-k choice and combine weights are the fp32 ones
    (in bf16 the scores' rounding, ~0.4 %, flips near-ties and swamps small biases such as the
    aux-loss-free step u = 1e-3). Without autocast x already has the parameters' dtype."""
    if not autocast:
        yield x_TD
        return
    with torch.autocast(x_TD.device.type, enabled=False):
        yield x_TD.to(torch.promote_types(x_TD.dtype, torch.float32))


@torch.no_grad()
def sum_loads_over_ranks(layers: list[MoE]) -> None:
    """Under data parallelism: every layer's load since the last optimizer step (for each router
    with an optimizer-step hook) summed over all ranks, in one all-reduce for all the layers, so
    that every rank's hook sees the same, global load. A no-op in one process. The training step
    calls it before the hooks (`hyperrouter.train.step`)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    slots = [
        (layer, attr)
        for layer in layers
        for router, attr in (
            (layer.router, "load_since_step"),
            (layer.second_router, "second_load_since_step"),
        )
        if router is not None and router.wants_optimizer_step
    ]
    if not slots:
        return
    loads = []
    for layer, attr in slots:
        load = getattr(layer, attr)
        loads.append(load if load.numel() else load.new_zeros(layer.num_experts))
    flat = torch.cat(loads)
    dist.all_reduce(flat)
    for (layer, attr), part in zip(slots, flat.split([len(x) for x in loads])):
        setattr(layer, attr, part.clone())


def _ffn_part(routing: Routing, ffn_experts: int) -> Routing:
    """The routing's FFN pairs only: slots on zero-computation experts (ids >= ffn_experts) are
    not kept and point at expert 0, so that dispatchers and backends see FFN ids alone."""
    zc_TK = routing.expert_ids >= ffn_experts
    keep_TK = ~zc_TK if routing.keep is None else routing.keep & ~zc_TK
    ids_TK = routing.expert_ids.masked_fill(zc_TK, 0)
    return dataclasses.replace(routing, expert_ids=ids_TK, keep=keep_TK)


def _with_zc_slots(
    routing: Routing, ffn_keep_TK: Tensor | None, zc: ZeroComputationExperts
) -> Tensor:
    """The final keep mask [T, K]: the FFN pairs the plan kept, and the slots on
    zero-computation experts the router (or token policy) kept (no capacity limit: they are
    free)."""
    zc_TK = routing.expert_ids >= zc.first
    if routing.keep is not None:
        zc_TK = zc_TK & routing.keep
    if ffn_keep_TK is None:
        return zc_TK | (routing.expert_ids < zc.first)
    return ffn_keep_TK | zc_TK


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def _check_backend(value: str) -> str:
    if value not in BACKENDS:
        raise HyperRouterError(f"unknown backend {value!r}; valid: {', '.join(BACKENDS)}")
    return value


@torch.no_grad()
def _routing_stats(
    routing: Routing,
    keep_TK: Tensor | None,
    num_experts: int,
    backend: str,
    top_k: int,
    wanted: int | None = None,
    ffn_experts: int | None = None,
) -> RoutingStats:
    """`ffn_experts`: with zero-computation experts, the ids below it are the FFN experts, the
    only ones `mean_k` counts."""
    ids_TK, logits_TE = routing.expert_ids, routing.logits
    device = ids_TK.device
    kept_ids = ids_TK.reshape(-1) if keep_TK is None else ids_TK[keep_TK]
    counts_E = torch.bincount(kept_ids, minlength=num_experts)
    entropy = None
    if logits_TE is not None:
        if logits_TE.shape[0] > 0:
            log_p = torch.log_softmax(at_least_fp32(logits_TE), dim=-1)
            entropy = -(log_p.exp() * log_p).sum(-1).mean()
        else:
            entropy = logits_TE.new_zeros((), dtype=torch.float32)
    # against the T * k assignments of the call (not the router's slots: expert choice pads its
    # token-major slots, and padding is not a drop)
    # (under a token policy, against the pairs the policy kept)
    if wanted is None:
        wanted = ids_TK.shape[0] * top_k
    dropped = max(0.0, 1.0 - kept_ids.numel() / wanted) if wanted else 0.0
    computed = kept_ids.numel() if ffn_experts is None else int((kept_ids < ffn_experts).sum())
    mean_k = computed / ids_TK.shape[0] if ids_TK.shape[0] else 0.0
    return RoutingStats(
        counts_E,
        entropy,
        torch.tensor(dropped, dtype=torch.float32, device=device),
        backend,
        top_k,
        {name: value.detach() for name, value in routing.stats.items()},
        torch.tensor(mean_k, dtype=torch.float32, device=device),
    )
