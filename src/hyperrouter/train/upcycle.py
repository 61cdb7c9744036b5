"""Start a run from another run's weights, upcycling its dense FFNs into MoE layers
(`train.init_from`, `train.init_noise`).

Sparse upcycling (Komatsuzaki et al. 2023, arXiv 2212.05055): every MoE layer of the new model
whose counterpart in the source run is a dense FFN gets E copies of that FFN as its experts (each
split into `granularity` experts of width d_hidden / m, with He et al.'s virtual-group router
initialisation and output scale, arXiv 2410.07524; `hyperrouter.integrations.transformers`'s
upcycling, which this reuses); every other parameter and buffer whose name and shape match is
copied; the rest (routers, parameters of another shape) keep their fresh initialisation. With a
router whose weights sum to 1 over the chosen experts (`topk_softmax`, the default of `smoe`,
`hyperrouter`, `smoe_dropout`) and no noise, the new model computes exactly what the source did
at step 0. Works for Transformer-XL (ReLU FFNs) and the Qwen3-style decoder (SwiGLU MLPs); the
source may be dense or MoE (an MoE source's layers are copied by name and shape, not upcycled).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hyperrouter.errors import HyperRouterError
from hyperrouter.moe import MoE


def _dense_mlp(module: nn.Module):
    """The source's dense FFN at a MoE layer's place, as upcycling reads it (None: none there)."""
    from hyperrouter.integrations.transformers.upcycle import DenseMLP, read_mlp

    core = getattr(module, "core", None)  # Transformer-XL's FeedForward: Linear-ReLU-Drop-Linear
    if isinstance(core, nn.Sequential) and getattr(module, "moe", None) is None:
        first, last = core[0], core[-1]
        return DenseMLP("relu", [first.weight.T], [first.bias], last.weight.T, last.bias, None)
    if {"gate_proj", "up_proj", "down_proj"} <= set(module._modules):
        return read_mlp(module)
    return None


def _counterpart(source: nn.Module, moe_name: str) -> nn.Module | None:
    """The source module holding the dense FFN where the new model has the MoE `moe_name`:
    the MoE's parent (Transformer-XL's `ff`, the decoder's `mlp`)."""
    parent = moe_name.rsplit(".", 1)[0]
    try:
        return source.get_submodule(parent)
    except AttributeError:
        return None


@torch.no_grad()
def initialise_from(
    model: nn.Module, source: nn.Module, *, noise: float = 0.0, seed: int = 0
) -> dict[str, int]:
    """Copy `source`'s matching weights into `model` and upcycle its dense FFNs into `model`'s
    MoE layers; returns counts (copied tensors, upcycled layers, tensors left as initialised)."""
    from hyperrouter.integrations.transformers.upcycle import _fill_experts, _virtual_groups

    generator = torch.Generator().manual_seed(seed)
    upcycled = 0
    moe_params: set[str] = set()
    for name, layer in model.named_modules():
        if not isinstance(layer, MoE):
            continue
        moe_params.update(f"{name}.{p}" for p, _ in layer.named_parameters())
        place = _counterpart(source, name)
        dense = None if place is None else _dense_mlp(place)
        if dense is None:
            continue
        width = layer.experts.d_hidden * layer.granularity
        if dense.d_hidden != width or dense.d_model != layer.d_model:
            raise HyperRouterError(
                f"train.init_from: the dense FFN at {name} is {dense.d_model} -> {dense.d_hidden}, "
                f"the experts need {layer.d_model} -> {width} (moe.d_expert * moe.granularity)"
            )
        if dense.activation != layer.experts.activation:
            raise HyperRouterError(
                f"train.init_from: the dense FFN at {name} uses {dense.activation}, the experts "
                f"{layer.experts.activation} (set moe.activation)"
            )
        if layer.zero_computation is not None:
            raise HyperRouterError(
                "train.init_from: upcycling into a layer with zero-computation experts is not "
                "supported"
            )
        _fill_experts(layer, dense, layer.granularity, noise, generator)
        if layer.granularity > 1:
            _virtual_groups(layer.router, layer.ffn_experts // layer.granularity, layer.granularity)
        upcycled += 1
    target = model.state_dict()
    copied = 0
    for key, value in source.state_dict().items():
        if key in target and key not in moe_params and target[key].shape == value.shape:
            target[key].copy_(value)
            copied += 1
    left = len(target) - copied - sum(1 for k in target if k in moe_params)
    return {"copied": copied, "upcycled_layers": upcycled, "left_initialised": left}


def load_source(path: str | Path, n_token: int, arch: str) -> nn.Module:
    """The run `path` (best all-experts checkpoint) as the start of a run with `n_token` tokens
    and architecture `arch`, or a one-line error saying why it cannot be."""
    from hyperrouter.train.evaluate import load_trained

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise HyperRouterError(f"train.init_from: {folder} holds no trained run (no config.json)")
    run = load_trained(folder, device=torch.device("cpu"))
    if run.config.model.arch != arch:
        raise HyperRouterError(
            f"train.init_from: {folder} is a {run.config.model.arch} model, this run {arch}"
        )
    if len(run.vocab) != n_token:
        raise HyperRouterError(
            f"train.init_from: {folder} has {len(run.vocab)} tokens, this run {n_token}: "
            f"train on the same data (and data.vocab_size)"
        )
    return run.model
