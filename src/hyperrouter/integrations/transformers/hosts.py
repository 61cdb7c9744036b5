"""The modules that carry hyperrouter routing inside a transformers model, and the model hooks
that feed them token ids and add their auxiliary losses to the model's loss.

- `RouterAdapter` stands where a transformers MoE block's router stood (`block.gate`, GPT-OSS's
  `block.router`): it routes with a registered hyperrouter router and returns what the block's
  code expects, (router_logits [T, E], weights [T, K], expert indices [T, K]); the block's own
  experts module computes.
- `UpcycledMLP` stands where a dense decoder layer's MLP stood: a `hyperrouter.MoE` called like
  the MLP (`mlp(hidden_states) -> hidden_states`).

Both keep the auxiliary losses of their last call (`pending_aux_losses`). Two hooks on the model
that `replace_routers` / `upcycle` were given drive them: before its forward they receive the call's
`input_ids` (routers such as `hash` route by token id; the batch row is the sequence id); after it,
in training mode when the call had `labels`, the losses (and the token-loss terms of routers such
as `rlr`) are added to `outputs.loss`; every call's losses are on `outputs.hyperrouter_aux_losses`
and `aux_losses(model)` (in evaluation they stay out of the loss, so it is the task loss). The
transformers code itself is not changed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hyperrouter.errors import HyperRouterError
from hyperrouter.moe.layer import MoE
from hyperrouter.routers import Router, Routing, RoutingContext
from hyperrouter.routers.losses import at_least_fp32


class HyperRouterModule(nn.Module):
    """Base of the integration's modules: the call's token ids, the pending auxiliary losses of
    the last call, and the training hooks (token-loss terms, once-per-optimizer-step state)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending_aux_losses: dict[str, Tensor] = {}
        self.token_ids: Tensor | None = None  # [batch, seq] of the model call, or None
        self.sequence_ids: Tensor | None = None

    def begin_forward(self, token_ids: Tensor | None, sequence_ids: Tensor | None) -> None:
        self.token_ids, self.sequence_ids = token_ids, sequence_ids
        self.pending_aux_losses = {}

    def end_forward(self) -> None:
        self.token_ids = self.sequence_ids = None

    @property
    def awaits_token_loss(self) -> bool:
        return False

    def token_loss_terms(self, token_loss_BS: Tensor) -> dict[str, Tensor]:
        """The routers' losses from the per-token task loss of the last training forward."""
        return {}

    def optimizer_step(self, step: int) -> None:
        """Once per optimizer step: the routers' state from the load since the previous step."""

    def set_step(self, step: int | None) -> None:
        """The optimizer step the routers see in their context (None outside training steps)."""


class RouterAdapter(HyperRouterModule):
    """A hyperrouter router in a transformers MoE block's router slot.

    Returns (router_logits [T, E] (zeros for routers without logits), weights [T, K] (times the
    architecture's `routed_scaling_factor`, 0 on pairs the router does not keep: the native
    experts still compute those, with weight 0), expert ids [T, K]). `experts` is the block's
    experts module, used only by routers that route by every expert's response (`competesmoe`);
    it is not registered here (the block owns it).
    """

    def __init__(
        self,
        router: Router,
        top_k: int,
        routed_scaling_factor: float = 1.0,
        experts: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.router = router
        self.num_experts = router.num_experts
        self.hidden_dim = router.d_model
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.top_k = top_k
        object.__setattr__(self, "_experts", experts)
        self.step: int | None = None
        self.register_buffer("load_since_step", torch.zeros(0, dtype=torch.long), persistent=False)
        self._awaiting: Routing | None = None

    @property
    def top_k(self) -> int:
        return self._top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise HyperRouterError(f"top_k must be an integer in [1, {self.num_experts}]")
        if not 1 <= value <= self.num_experts:
            raise HyperRouterError(f"top_k must be in [1, {self.num_experts}], got {value}")
        self._top_k = value

    def extra_repr(self) -> str:
        scale = self.routed_scaling_factor
        return f"top_k={self.top_k}" + (f", routed_scaling_factor={scale}" if scale != 1 else "")

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_TD = hidden_states.reshape(-1, self.hidden_dim)
        num_tokens = x_TD.shape[0]
        router = self.router
        k = self.num_experts if router.uses_all_experts else self.top_k
        ctx = RoutingContext(
            top_k=k,
            training=self.training,
            step=self.step,
            token_ids=_flat(self.token_ids, num_tokens),
            sequence_ids=_flat(self.sequence_ids, num_tokens),
        )
        x_router = x_TD.to(_router_dtype(router, x_TD))
        routing = self._route(x_router, x_TD, ctx)
        weights_TK = routing.weights
        if routing.keep is not None:
            weights_TK = weights_TK * routing.keep
        if self.routed_scaling_factor != 1:
            weights_TK = weights_TK * self.routed_scaling_factor
        logits_TE = routing.logits
        if logits_TE is None:
            logits_TE = x_TD.new_zeros(num_tokens, self.num_experts, dtype=torch.float32)
        self.pending_aux_losses = dict(routing.aux_losses)
        if self.training:
            self._bookkeeping(routing)
        return logits_TE, weights_TK, routing.expert_ids

    def _route(self, x_router: Tensor, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        router = self.router
        competes = type(router).wants_expert_responses is not Router.wants_expert_responses
        if competes and x_TD.shape[0] > 0 and router.wants_expert_responses(ctx):
            responses_TED = self._responses(x_TD).to(x_router.dtype)
            return router.route_by_responses(x_router, ctx, responses_TED)
        return router(x_router, ctx)

    @torch.no_grad()
    def _responses(self, x_TD: Tensor) -> Tensor:
        """Every expert's output on every token, [T, E, d] (E calls of the block's experts)."""
        experts = self._experts
        if experts is None:
            raise HyperRouterError(
                f"router {self.router.registry_name!r} routes by the experts' responses but this "
                f"adapter was built without the block's experts module"
            )
        num_tokens = x_TD.shape[0]
        ones_T1 = x_TD.new_ones(num_tokens, 1)
        outputs = []
        for e in range(self.num_experts):
            ids_T1 = torch.full((num_tokens, 1), e, dtype=torch.long, device=x_TD.device)
            outputs.append(experts(x_TD, ids_T1, ones_T1))
        return torch.stack(outputs, 1)

    def _bookkeeping(self, routing: Routing) -> None:
        router = self.router
        if router.wants_token_loss:
            self._awaiting = routing
        if router.wants_optimizer_step:
            with torch.no_grad():
                ids = routing.expert_ids
                kept = ids.reshape(-1) if routing.keep is None else ids[routing.keep]
                counts = torch.bincount(kept, minlength=self.num_experts)
                load = self.load_since_step
                self.load_since_step = counts if load.numel() == 0 else load + counts

    @property
    def awaits_token_loss(self) -> bool:
        return self._awaiting is not None

    def token_loss_terms(self, token_loss_BS: Tensor) -> dict[str, Tensor]:
        routing, self._awaiting = self._awaiting, None
        if routing is None:
            return {}
        return self.router.token_loss_terms(routing, token_loss_BS.reshape(-1).detach())

    def optimizer_step(self, step: int) -> None:
        if self.router.wants_optimizer_step:
            load = self.load_since_step
            if load.numel() == 0:
                load = torch.zeros(self.num_experts, dtype=torch.long, device=load.device)
            self.router.optimizer_step(load, step)
        self.load_since_step = self.load_since_step.new_zeros(0)

    def set_step(self, step: int | None) -> None:
        self.step = step


class UpcycledMLP(HyperRouterModule):
    """A `hyperrouter.MoE` where a dense decoder layer's MLP stood, called like that MLP; the
    MLP's output dropout (GPT-2's resid_pdrop) stays after the MoE."""

    def __init__(self, moe: MoE, dropout: nn.Module | None = None) -> None:
        super().__init__()
        self.moe = moe
        self.dropout = dropout

    @property
    def top_k(self) -> int:
        return self.moe.top_k

    def forward(self, hidden_states: Tensor) -> Tensor:
        lead = hidden_states.shape[:-1]
        out = self.moe(
            hidden_states,
            token_ids=_shaped(self.token_ids, lead),
            sequence_ids=_shaped(self.sequence_ids, lead),
            return_details=True,
        )
        self.pending_aux_losses = dict(out.aux_losses)
        return out.output if self.dropout is None else self.dropout(out.output)

    @property
    def awaits_token_loss(self) -> bool:
        return self.training and any(r.wants_token_loss for r in self.moe.routers)

    def token_loss_terms(self, token_loss_BS: Tensor) -> dict[str, Tensor]:
        return self.moe.token_loss_terms(token_loss_BS)

    def optimizer_step(self, step: int) -> None:
        self.moe.optimizer_step(step)

    def set_step(self, step: int | None) -> None:
        self.moe.step = step


def hosts(model: nn.Module) -> list[HyperRouterModule]:
    """The integration's modules in `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, HyperRouterModule)]


def aux_losses(model: nn.Module) -> dict[str, Tensor]:
    """The auxiliary losses of the model's last forward, each summed over layers (already
    weighted; token-loss terms included when that forward had labels in training)."""
    total: dict[str, Tensor] = {}
    for host in hosts(model):
        for name, value in host.pending_aux_losses.items():
            total[name] = total[name] + value if name in total else value
    return total


def optimizer_step(model: nn.Module, step: int) -> None:
    """Call once per optimizer step in training (after `optimizer.step()`): routers with state
    updated from the load (aux_free's bias, stablemoe's stage, remoe's lambda, vqmoe's codebook)
    see the load since the previous call. `trainer_callback()` does it in a transformers Trainer."""
    for host in hosts(model):
        host.optimizer_step(step)


def set_step(model: nn.Module, step: int | None) -> None:
    """The optimizer step the routers see in their context (`RoutingContext.step`)."""
    for host in hosts(model):
        host.set_step(step)


def install_model_hooks(model: nn.Module) -> None:
    """Hooks on `model` (once) that give its routers the call's token ids and add their
    auxiliary losses to the loss."""
    if any(hook is _before_forward for hook in model._forward_pre_hooks.values()):
        return
    model.register_forward_pre_hook(_before_forward, with_kwargs=True)
    model.register_forward_hook(_after_forward, with_kwargs=True)


def _before_forward(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], Tensor) and not args[0].is_floating_point():
        ids = args[0]
    seq = None
    if isinstance(ids, Tensor) and ids.dim() == 2:
        seq = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
    elif not isinstance(ids, Tensor):
        ids = None
    for host in hosts(module):
        host.begin_forward(ids, seq)


def _after_forward(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    found = hosts(module)
    for host in found:
        host.end_forward()
    labels = kwargs.get("labels")
    if labels is not None and module.training:
        _add_token_loss_terms(found, output, labels)
    losses = aux_losses(module)
    if hasattr(output, "to_tuple"):  # a transformers ModelOutput
        output.hyperrouter_aux_losses = losses
    if labels is None or not module.training or not losses:
        return None
    total = sum(losses.values())
    if isinstance(output, tuple):
        if output and isinstance(output[0], Tensor) and output[0].dim() == 0:
            return (output[0] + total.to(output[0].dtype),) + tuple(output[1:])
        return None
    loss = getattr(output, "loss", None)
    if isinstance(loss, Tensor):
        output.loss = loss + total.to(device=loss.device, dtype=loss.dtype)
    return None


def _add_token_loss_terms(found: list[HyperRouterModule], output: Any, labels: Tensor) -> None:
    """Routers that learn from the per-token loss (`rlr`) get the causal-LM cross-entropy of each
    position's next-token prediction (0 at the last position and at ignored labels, -100)."""
    waiting = [host for host in found if host.awaits_token_loss]
    if not waiting:
        return
    logits = getattr(output, "logits", None)
    if not isinstance(logits, Tensor) or logits.shape[:-1] != labels.shape:
        raise HyperRouterError(
            "a router learns from the per-token loss: the model must return logits over every "
            "labelled position (call it with return_dict=True and logits_to_keep=0)"
        )
    next_labels = F.pad(labels, (0, 1), value=-100)[..., 1:].to(logits.device)
    token_loss = F.cross_entropy(
        at_least_fp32(logits).reshape(-1, logits.shape[-1]),
        next_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view_as(labels)
    for host in waiting:
        for name, value in host.token_loss_terms(token_loss).items():
            host.pending_aux_losses[name] = value


def trainer_callback() -> Any:
    """A transformers `TrainerCallback` that gives the routers the optimizer step and calls their
    once-per-step hooks (`optimizer_step`) after each optimizer step of a `Trainer`."""
    from transformers import TrainerCallback

    class HyperRouterCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
            if model is not None:
                set_step(model, state.global_step)

        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
            if model is not None:
                optimizer_step(model, state.global_step)
                set_step(model, None)

    return HyperRouterCallback()


def _flat(ids: Tensor | None, num_tokens: int) -> Tensor | None:
    """The call's ids as [T] when they cover the routed tokens (else None: e.g. inputs_embeds)."""
    if ids is None or ids.numel() != num_tokens:
        return None
    return ids.reshape(-1)


def _shaped(ids: Tensor | None, lead: torch.Size) -> Tensor | None:
    if ids is None or ids.shape != lead:
        return None
    return ids


def _router_dtype(router: Router, x_TD: Tensor) -> torch.dtype:
    """Routers compute in their parameters' dtype (fp32 at least when they have none)."""
    for p in router.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.promote_types(x_TD.dtype, torch.float32)
