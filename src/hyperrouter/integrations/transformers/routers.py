"""Hyperrouter routers in the MoE blocks of transformers models (`replace_routers`), and k for
every MoE block or upcycled layer of a model (`set_top_k`).

A MoE block is found structurally: a module with an `experts` child and a router child (`gate`,
or `router` in GPT-OSS) that has a 2-D `weight` [E, d] and an integer `top_k`. In transformers 5
such a block calls `router(hidden) -> (router_logits, weights, indices)` and then
`experts(hidden, indices, weights)`; the adapter keeps that contract, so the block's code, its
experts (weights untouched), its shared experts (Qwen2-MoE's sigmoid-gated one, DeepSeek-V3's)
and the rest of the model run as before. The routing rule of each known router class is in
`NATIVE_RULES` (read from transformers 5.25's modeling files); other router classes are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hyperrouter.errors import HyperRouterError
from hyperrouter.integrations.transformers._common import (
    check_json,
    check_top_k,
    record,
    require_transformers,
    set_record,
)
from hyperrouter.integrations.transformers.hosts import (
    RouterAdapter,
    UpcycledMLP,
    hosts,
    install_model_hooks,
)
from hyperrouter.moe.layer import MoE
from hyperrouter.routers import ROUTERS, build_router
from hyperrouter.routers.aux_free import AuxFreeRouter


@dataclass(frozen=True)
class NativeRule:
    """How an architecture's router turns logits into weights, as `select_experts` options:
    `renormalize` None means the router's own `norm_topk_prob`; `bias`: the gate has a bias."""

    architecture: str
    score: str
    renormalize: bool | None
    bias: bool


# router class -> its routing (transformers 5.25 modeling_*.py):
#   Mixtral: softmax over E, top-k, always renormalised; OLMoE / Qwen2-MoE / Qwen3-MoE: the same,
#   renormalised if norm_topk_prob; DeepSeek-V3: sigmoid, choice on sigmoid + e_score_correction_
#   bias within the topk_group best of n_group groups, weights the unbiased sigmoid, renormalised
#   if norm_topk_prob, times routed_scaling_factor; GPT-OSS: top-k of the logits (with bias),
#   softmax over the k.
NATIVE_RULES = {
    "MixtralTopKRouter": NativeRule("Mixtral", "softmax_topk", True, False),
    "OlmoeTopKRouter": NativeRule("OLMoE", "softmax_topk", None, False),
    "Qwen2MoeTopKRouter": NativeRule("Qwen2-MoE", "softmax_topk", None, False),
    "Qwen3MoeTopKRouter": NativeRule("Qwen3-MoE", "softmax_topk", None, False),
    "DeepseekV3TopkRouter": NativeRule("DeepSeek-V3", "sigmoid", None, False),
    "GptOssTopKRouter": NativeRule("GPT-OSS", "topk_softmax", False, True),
}
SUPPORTED = ", ".join(rule.architecture for rule in NATIVE_RULES.values())
# routers whose Linear gate can take the native gate's weights (init="native")
NATIVE_INIT_ROUTERS = ("smoe", "smoe_dropout", "aux_free")
INITS = ("native", "random")


@dataclass
class MoEBlock:
    """A transformers MoE block: the block, the attribute holding its router, and that router."""

    block: nn.Module
    attr: str
    router: nn.Module

    @property
    def replaced(self) -> bool:
        return isinstance(self.router, RouterAdapter)


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every MoE block of a transformers model (native or already replaced), in module order."""
    blocks = []
    for module in model.modules():
        if isinstance(module, MoE) or not isinstance(module._modules.get("experts"), nn.Module):
            continue
        for attr in ("gate", "router"):
            router = module._modules.get(attr)
            if isinstance(router, RouterAdapter) or _is_topk_router(router):
                blocks.append(MoEBlock(module, attr, router))
                break
    return blocks


def _is_topk_router(module: nn.Module | None) -> bool:
    weight = getattr(module, "weight", None)
    top_k = getattr(module, "top_k", None)
    return isinstance(weight, Tensor) and weight.dim() == 2 and isinstance(top_k, int)


def native_rule(router: nn.Module, model: nn.Module) -> NativeRule:
    """The routing rule of a native router, or a one-line error for an unknown architecture."""
    rule = NATIVE_RULES.get(type(router).__name__)
    if rule is None:
        raise HyperRouterError(
            f"unsupported architecture {_model_name(model)} (router class "
            f"{type(router).__name__}); supported: {SUPPORTED}"
        )
    return rule


def replace_routers(
    model: nn.Module,
    router: str = "hyperrouter",
    top_k: int | None = None,
    *,
    init: str | None = None,
    **options: Any,
) -> nn.Module:
    """Put a registered hyperrouter router in every MoE block of a transformers model.

    router / options: a name of `hyperrouter.routers.ROUTERS` and its options (for `smoe`,
    `smoe_dropout` and `aux_free` the architecture's score, renormalize and gate bias are the
    defaults). top_k: experts per token (None: the model's own k). init: `native` (the default for
    `smoe`, `smoe_dropout` and `aux_free`) copies the native gate (and DeepSeek-V3's
    e_score_correction_bias into aux_free's expert_bias), so that the model computes what it
    computed before at its own k; `random`: the router's own initialisation. The experts keep
    their weights. Returns the model (changed in place); the change is recorded in
    `config.hyperrouter` so that `load_pretrained` can redo it.
    """
    require_transformers()
    blocks = find_moe_blocks(model)
    if not blocks:
        raise HyperRouterError(
            f"{_model_name(model)} has no MoE block (experts with a gate/router module); "
            f"replace_routers supports {SUPPORTED}; upcycle() turns dense models into MoE ones"
        )
    if router not in ROUTERS:
        raise HyperRouterError(f"unknown router {router!r}; valid: {', '.join(sorted(ROUTERS))}")
    if ROUTERS[router].dispatch == "merge":
        raise HyperRouterError(
            f"router {router!r} merges the experts' parameters (dispatch 'merge'); a transformers "
            f"experts module only computes per-token outputs: choose another router"
        )
    if init is None:
        init = "native" if router in NATIVE_INIT_ROUTERS else "random"
    if init not in INITS:
        raise HyperRouterError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if init == "native" and router not in NATIVE_INIT_ROUTERS:
        raise HyperRouterError(
            f"init='native' copies the native gate into a linear gate: routers "
            f"{', '.join(NATIVE_INIT_ROUTERS)}; router {router!r} needs init='random'"
        )
    if any(b.replaced for b in blocks):
        raise HyperRouterError(
            f"{_model_name(model)}'s routers were already replaced; load or build the original "
            f"model to replace them again"
        )
    check_json("router", options)
    resolved: dict[str, Any] = {}
    built: list[tuple[MoEBlock, RouterAdapter]] = []  # all built first: an error changes nothing
    for found in blocks:
        native = found.router
        rule = native_rule(native, model)
        num_experts, d_model = native.weight.shape
        k = native.top_k if top_k is None else check_top_k(top_k, num_experts)
        resolved = _arch_defaults(rule, native) if router in NATIVE_INIT_ROUTERS else {}
        resolved.update(options)
        new = build_router(router, d_model, num_experts, **resolved)
        new.to(device=native.weight.device, dtype=native.weight.dtype)
        if init == "native":
            _copy_native_gate(new, native, rule)
        scale = float(getattr(native, "routed_scaling_factor", 1.0))
        adapter = RouterAdapter(new, k, scale, found.block._modules["experts"])
        adapter.train(native.training)
        built.append((found, adapter))
    _install_capture_hooks(model)
    for found, adapter in built:
        _take_hooks(found.router, adapter)
        setattr(found.block, found.attr, adapter)
    set_record(model, "routers", {"router": router, "top_k": top_k, "options": resolved})
    install_model_hooks(model)
    return model


def _arch_defaults(rule: NativeRule, native: nn.Module) -> dict[str, Any]:
    renormalize = rule.renormalize
    if renormalize is None:
        renormalize = bool(getattr(native, "norm_topk_prob", False))
    return {"score": rule.score, "renormalize": renormalize, "bias": rule.bias}


@torch.no_grad()
def _copy_native_gate(new: nn.Module, native: nn.Module, rule: NativeRule) -> None:
    """The native gate's weights into the new router's Linear gate (one-line errors where the
    new router cannot compute what the native one did)."""
    arch = rule.architecture
    groups, topk_groups = getattr(native, "num_group", 1), getattr(native, "topk_group", 1)
    if groups > 1 and topk_groups < groups:
        raise HyperRouterError(
            f"{arch}'s group-limited routing (n_group={groups}, topk_group={topk_groups}) has no "
            f"counterpart in hyperrouter's routers: init='native' needs topk_group == n_group; "
            f"init='random' routes without the group limit"
        )
    gate = new.gate
    gate.weight.copy_(native.weight)
    native_bias = getattr(native, "bias", None)
    if isinstance(native_bias, Tensor):
        if gate.bias is None:
            raise HyperRouterError(
                f"{arch}'s router has a bias: init='native' needs router option bias=True"
            )
        gate.bias.copy_(native_bias)
    elif gate.bias is not None:
        gate.bias.zero_()
    correction = getattr(native, "e_score_correction_bias", None)
    if isinstance(new, AuxFreeRouter):
        if isinstance(correction, Tensor):
            new.expert_bias.copy_(correction)
    elif isinstance(correction, Tensor) and bool(correction.ne(0).any()):
        raise HyperRouterError(
            f"{arch}'s e_score_correction_bias is not zero and router "
            f"{new.registry_name!r} has no selection bias: use router='aux_free' (it takes the "
            f"bias as its expert_bias)"
        )


def _install_capture_hooks(model: nn.Module) -> None:
    """Install transformers' output-recording hooks now (they are installed lazily, by class, at
    the first call that asks for router_logits), so that the native routers hold them and the
    adapters can take them over; `output_router_logits=True` then records the adapters' logits."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:
        return
    base = getattr(model, "base_model", model)
    if hasattr(base, "config"):
        maybe_install_capturing_hooks(base)


def _take_hooks(native: nn.Module, adapter: nn.Module) -> None:
    """The native router's forward hooks (transformers' router_logits recorder) on the adapter."""
    for hook_id, hook in native._forward_hooks.items():
        adapter.register_forward_hook(
            hook,
            with_kwargs=hook_id in native._forward_hooks_with_kwargs,
            always_call=hook_id in native._forward_hooks_always_called,
        )


class TopKChange:
    """What `set_top_k` changed; leaving a `with` block (or `restore()`) puts the old k back."""

    def __init__(self, previous: list[tuple[Any, str, Any]]) -> None:
        self._previous = previous

    def restore(self) -> None:
        for obj, attr, value in reversed(self._previous):
            setattr(obj, attr, value)
        self._previous = []

    def __enter__(self) -> TopKChange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def set_top_k(model: nn.Module, k: int) -> TopKChange:
    """Experts per token for every MoE block (native: its router's top_k; replaced: the
    adapter's) and every upcycled layer of `model`, k in [1, E]. Also updates the model's other
    records of k (the CausalLM's `num_experts_per_tok`, used by its balance loss, and the
    config's, so that save_pretrained writes it). Usable as `with set_top_k(model, 1): ...`,
    which restores the previous k on exit."""
    require_transformers()
    targets: list[tuple[Any, str, int]] = []  # (object, attribute, E)
    for found in find_moe_blocks(model):
        if found.replaced:
            targets.append((found.router, "top_k", found.router.num_experts))
            continue
        native_rule(found.router, model)
        num_experts = found.router.weight.shape[0]
        targets.append((found.router, "top_k", num_experts))
        if isinstance(getattr(found.block, "top_k", None), int):
            targets.append((found.block, "top_k", num_experts))
    upcycled = [h for h in hosts(model) if isinstance(h, UpcycledMLP)]
    targets += [(h.moe, "top_k", h.moe.num_experts) for h in upcycled]
    if not targets:
        raise HyperRouterError(
            f"{_model_name(model)} has no MoE block or upcycled MLP to set top_k on; supported "
            f"MoE architectures: {SUPPORTED}"
        )
    check_top_k(k, min(e for _, _, e in targets))
    changes: list[tuple[Any, str, Any]] = [(obj, attr, k) for obj, attr, _ in targets]
    if len(targets) > len(upcycled):  # the model's own MoE blocks: its other records of k
        for module in model.modules():
            if isinstance(getattr(module, "num_experts_per_tok", None), int):
                changes.append((module, "num_experts_per_tok", k))
        config = getattr(model, "config", None)
        if isinstance(getattr(config, "num_experts_per_tok", None), int):
            changes.append((config, "num_experts_per_tok", k))
    config = getattr(model, "config", None)
    rec = record(model)
    if config is not None and rec:
        updated = {key: {**value, "top_k": k} for key, value in rec.items()}
        changes.append((config, "hyperrouter", updated))
    previous = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in changes]
    for obj, attr, value in changes:
        setattr(obj, attr, value)
    return TopKChange(previous)


def _model_name(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    name = type(model).__name__
    return f"{name} ({model_type})" if model_type else name
