"""Sparse upcycling: the dense MLPs of a transformers decoder become `hyperrouter.MoE` layers of E
copies of the MLP (Komatsuzaki, Puigcerver, Lee-Thorp, Riquelme, Mustafa, Ainslie, Tay, Dehghani,
Houlsby: "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints", ICLR 2023,
arXiv 2212.05055), optionally fine-grained (He, Khattar, Prenger, Korthikanti, Yan, Liu, Fan,
Aithal, Shoeybi, Catanzaro: "Upcycling Large Language Models into Mixture of Experts", 2024,
arXiv 2410.07524; Megatron-Core's `upcycling_utils.py`).

Recognised MLPs, each a decoder layer's `mlp` child:
- gated (Llama, Mistral, Qwen2, Qwen3, ...): gate_proj, up_proj, down_proj Linear layers with SiLU
  -> `activation="swiglu"` (bias only with Llama's mlp_bias);
- GPT-2's Conv1D MLP: c_fc, c_proj with gelu_new / gelu_pytorch_tanh / gelu_fast (the tanh
  approximation, `activation="gelu_tanh"`), exact gelu, or relu; its output dropout stays.

Granularity m (He et al.'s fine-grained upcycling): each copy's hidden units are split into m
experts of width h / m (the i-th expert of copy c holds units [i h/m, (i+1) h/m)), so the layer
has E m experts and k counts them. A dense MLP is the sum of its m pieces, so a token gets the
MLP's output when it uses every piece of a copy with the same weight. He et al.'s "virtual group"
initialisation makes that happen: the m experts of a copy share one router row, so a top-k with
k a multiple of m chooses whole copies (done here for routers with a Linear gate). Their weight
scaling restores the scale: with weights renormalised over the k chosen experts, each copy's
pieces carry 1/m of its weight, so the outputs are multiplied by m; with softmax-then-top-k
weights that are not renormalised, by E m^2 / k (exact for a uniform router, about right for a
near-uniform one). He et al. spread the factor over both projections (its square root each, its
cube root for gated MLPs), which keeps the output only for positively homogeneous activations; here
the down projection alone takes it, which is exact for any activation.

At initialisation (noise 0) the upcycled model's outputs equal the dense model's when the router's
weights over the chosen experts sum to 1 (topk_softmax, renormalised softmax_topk or sigmoid: smoe's
default is one), with any router initialisation at m = 1 and with the virtual-group initialisation
and k a multiple of m at m > 1. `noise` multiplies each copy's weights by 1 + noise N(0, 1)
(seeded), so that the copies can diverge (the paper's copies are exact; noise is an option).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hyperrouter.errors import HyperRouterError
from hyperrouter.integrations.transformers._common import (
    check_json,
    check_positive_int,
    check_top_k,
    require_transformers,
    set_record,
)
from hyperrouter.integrations.transformers.hosts import UpcycledMLP, install_model_hooks
from hyperrouter.moe.layer import MoE
from hyperrouter.routers import LogitRouter, Router

SUPPORTED_MLPS = (
    "gated MLPs with SiLU (gate_proj, up_proj, down_proj: Llama, Mistral, Qwen2, Qwen3) and "
    "GPT-2's Conv1D MLP (c_fc, c_proj with gelu_new, gelu or relu)"
)
GATED_ACTIVATIONS = {"SiLUActivation": "swiglu", "SiLU": "swiglu"}
PLAIN_ACTIVATIONS = {
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "GELUActivation": "gelu",
    "ReLU": "relu",
}


@dataclass
class DenseMLP:
    """A dense MLP's weights in x @ W form: w_in [d, h] per input projection (gate then up for
    a gated MLP), their biases [h], w_out [h, d], b_out [d]."""

    activation: str
    w_in: list[Tensor]
    b_in: list[Tensor | None]
    w_out: Tensor
    b_out: Tensor | None
    dropout: nn.Module | None

    @property
    def d_model(self) -> int:
        return self.w_out.shape[1]

    @property
    def d_hidden(self) -> int:
        return self.w_out.shape[0]

    @property
    def bias(self) -> bool:
        return self.b_out is not None


def read_mlp(mlp: nn.Module) -> DenseMLP | None:
    """The weights of a recognised dense MLP (None if `mlp` is not one; a one-line error for a
    recognised layout with an activation hyperrouter's experts do not have)."""
    children = mlp._modules
    if all(isinstance(children.get(n), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        act = _activation(mlp, "act_fn", GATED_ACTIVATIONS, "gated")
        gate, up, down = children["gate_proj"], children["up_proj"], children["down_proj"]
        return DenseMLP(
            act,
            [gate.weight.T, up.weight.T],
            [gate.bias, up.bias],
            down.weight.T,
            down.bias,
            None,
        )
    c_fc, c_proj = children.get("c_fc"), children.get("c_proj")
    if type(c_fc).__name__ == "Conv1D" and type(c_proj).__name__ == "Conv1D":
        act = _activation(mlp, "act", PLAIN_ACTIVATIONS, "GPT-2")
        dropout = children.get("dropout")
        return DenseMLP(act, [c_fc.weight], [c_fc.bias], c_proj.weight, c_proj.bias, dropout)
    return None


def _activation(mlp: nn.Module, attr: str, known: dict[str, str], kind: str) -> str:
    module = getattr(mlp, attr, None)
    name = type(module).__name__
    if name == "GELU":  # torch's own
        return "gelu_tanh" if getattr(module, "approximate", "none") == "tanh" else "gelu"
    if name not in known:
        raise HyperRouterError(
            f"{kind} MLP {type(mlp).__name__} has activation {name}, which upcycle cannot copy; "
            f"supported: {', '.join(sorted(known))}"
        )
    return known[name]


def find_dense_mlps(model: nn.Module) -> list[tuple[nn.Module, DenseMLP]]:
    """(decoder layer, its MLP's weights) for every recognised `mlp` child, in module order."""
    found = []
    for parent in model.modules():
        mlp = parent._modules.get("mlp")
        if mlp is not None and not isinstance(mlp, UpcycledMLP):
            dense = read_mlp(mlp)
            if dense is not None:
                found.append((parent, dense))
    return found


def upcycle(
    model: nn.Module,
    num_experts: int = 8,
    router: str = "smoe",
    top_k: int = 2,
    granularity: int = 1,
    noise: float = 0.0,
    *,
    seed: int = 0,
    **options: Any,
) -> nn.Module:
    """Turn every dense MLP of a transformers decoder into a `hyperrouter.MoE` of `num_experts`
    copies (each split into `granularity` experts) with router `router` (its `options`) and
    `top_k` of the num_experts * granularity experts. Returns the model, changed in place and
    recorded in `config.hyperrouter` (see the module docstring for when outputs are unchanged)."""
    require_transformers()
    check_positive_int("num_experts", num_experts)
    check_positive_int("granularity", granularity)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise HyperRouterError(f"noise must be a number >= 0, got {noise!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise HyperRouterError(f"seed must be an integer, got {seed!r}")
    check_top_k(top_k, num_experts * granularity, "top_k (of num_experts * granularity)")
    check_json("router", options)
    found = find_dense_mlps(model)
    if not found:
        name = type(model).__name__
        raise HyperRouterError(f"{name} has no MLP upcycle recognises; supported: {SUPPORTED_MLPS}")
    for _, dense in found:
        if dense.d_hidden % granularity:
            raise HyperRouterError(
                f"granularity {granularity} does not divide the MLP hidden width {dense.d_hidden}"
            )
    generator = torch.Generator().manual_seed(seed)
    built = []  # all built first: an error (e.g. a bad router option) changes nothing
    for parent, dense in found:
        moe = MoE(
            dense.d_model,
            num_experts,
            dense.d_hidden,
            top_k,
            router=router,
            router_options=options,
            activation=dense.activation,
            bias=dense.bias,
            granularity=granularity,
        )
        _fill_experts(moe, dense, granularity, noise, generator)
        if granularity > 1:
            _virtual_groups(moe.router, num_experts, granularity)
        moe.to(device=dense.w_out.device, dtype=dense.w_out.dtype)
        moe.train(parent._modules["mlp"].training)
        built.append((parent, UpcycledMLP(moe, dense.dropout)))
    for parent, upcycled in built:
        parent.mlp = upcycled
    set_record(
        model,
        "upcycle",
        {
            "num_experts": num_experts,
            "router": router,
            "top_k": top_k,
            "granularity": granularity,
            "noise": float(noise),
            "seed": seed,
            "options": dict(options),
        },
    )
    install_model_hooks(model)
    return model


@torch.no_grad()
def _fill_experts(
    moe: MoE, dense: DenseMLP, granularity: int, noise: float, generator: torch.Generator
) -> None:
    """Expert c * m + i = piece i of copy c; the down projection times the output scale."""
    experts = moe.experts
    width = dense.d_hidden // granularity
    pieces = [slice(i * width, (i + 1) * width) for i in range(granularity)]
    copies = moe.num_experts // granularity
    scale = output_scale(moe.router, copies, granularity, moe.top_k)
    w_in = torch.stack([torch.cat([w[:, p] for w in dense.w_in], 1) for p in pieces])
    w_out = torch.stack([dense.w_out[p] for p in pieces]) * scale
    experts.w_in.copy_(_perturbed(w_in.repeat(copies, 1, 1), noise, generator))
    experts.w_out.copy_(_perturbed(w_out.repeat(copies, 1, 1), noise, generator))
    if experts.b_in is not None:
        b_in = torch.stack(
            [torch.cat([_or_zeros(b, dense)[p] for b in dense.b_in]) for p in pieces]
        )
        experts.b_in.copy_(b_in.repeat(copies, 1))
        experts.b_out.copy_(dense.b_out.expand_as(experts.b_out))


def output_scale(router: Router, copies: int, granularity: int, top_k: int) -> float:
    """He et al.'s factor: m for weights that sum to 1 over the chosen experts, E m^2 / k for
    softmax-then-top-k weights without renormalisation."""
    if isinstance(router, LogitRouter) and router.score == "softmax_topk":
        if not router.renormalize:
            return copies * granularity * granularity / top_k
    return float(granularity)


def _perturbed(w: Tensor, noise: float, generator: torch.Generator) -> Tensor:
    if noise == 0:
        return w
    eps = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w.dtype)
    return w * (1 + noise * eps.to(w.device))


def _or_zeros(b: Tensor | None, dense: DenseMLP) -> Tensor:
    """An input projection's bias, zeros where the MLP has none for it."""
    if b is not None:
        return b
    return dense.w_out.new_zeros(dense.d_hidden)


@torch.no_grad()
def _virtual_groups(router: Router, copies: int, granularity: int) -> None:
    """He et al.'s virtual-group initialisation: the m experts of a copy share the router row of
    the copy's first expert (routers with a Linear gate; others keep their own initialisation)."""
    gate = getattr(router, "gate", None)
    if not isinstance(gate, nn.Linear) or gate.out_features != copies * granularity:
        return
    rows = gate.weight.view(copies, granularity, -1)
    rows.copy_(rows[:, :1].expand_as(rows))
    if gate.bias is not None:
        bias = gate.bias.view(copies, granularity)
        bias.copy_(bias[:, :1].expand_as(bias))
