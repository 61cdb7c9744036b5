"""Routing API v2 keeps the original routers bit-identical.

`tests/fixtures/routing_v1.json` (a SHA-256 of every tensor's bytes, and its norm for diagnosis)
was written by `_cases()` with the code as it stood before the routing interface v2 (6f6b0ef).
Every case is recomputed here and must match exactly:
outputs, auxiliary losses, routing statistics and the gradients of the input and every parameter,
for the four original routers, every backend, several k, with and without a capacity limit (k = 1,
where first-come-first-served and first-choice-first priority agree) and a padding mask; plus a
small Transformer-XL's loss and gradients. Regenerate only on purpose: HYPERROUTER_WRITE_FIXTURE=1.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from hyperrouter import MoE
from hyperrouter.models.transformer_xl import ModelConfig, MoEConfig, TransformerXL

FIXTURE = Path(__file__).parent / "fixtures" / "routing_v1.json"
E, D, H = 8, 16, 24
SETUPS = {
    "smoe": ("smoe", {}),
    "smoe_losses": ("smoe", {"balance_loss_weight": 0.01, "z_loss_weight": 0.001}),
    "smoe_dropout": ("smoe_dropout", {}),
    "hyperrouter": ("hyperrouter", {"hyper_hidden": 32}),
    "dense": ("dense", {}),
    "dense_uniform": ("dense", {"weighting": "uniform"}),
    "dense_hyper": ("dense", {"base": "hyperrouter", "base_options": {"hyper_hidden": 32}}),
}


def _layer(router: str, options: dict, **kwargs) -> MoE:
    torch.manual_seed(0)
    layer = MoE(D, E, H, 2, router=router, router_options=options, **kwargs)
    with torch.no_grad():
        for name, p in layer.experts.named_parameters():
            p.normal_(0.0, 0.3 if name.startswith("w_") else 0.1)
        for module in layer.router.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.1)
    return layer


def _record(out: dict, prefix: str, layer: MoE, x: torch.Tensor, call) -> None:
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    res = call(x)
    torch.manual_seed(1)
    loss = (res.output * torch.randn_like(res.output)).sum()
    for value in res.aux_losses.values():
        loss = loss + value
    loss.backward()
    out[f"{prefix}/output"] = res.output.detach()
    for name, value in res.aux_losses.items():
        out[f"{prefix}/aux/{name}"] = value.detach().reshape(1)
    out[f"{prefix}/stats/tokens_per_expert"] = res.stats.tokens_per_expert
    out[f"{prefix}/stats/entropy"] = res.stats.entropy.reshape(1)
    out[f"{prefix}/stats/dropped"] = res.stats.dropped_fraction.reshape(1)
    out[f"{prefix}/grad/x"] = x.grad
    for name, p in layer.named_parameters():
        if p.grad is not None:
            out[f"{prefix}/grad/{name}"] = p.grad


def _cases() -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    torch.manual_seed(2)
    x = torch.randn(3, 9, D)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 6:] = False
    mask[2, 3:] = False
    for setup, (router, options) in SETUPS.items():
        for backend in ("reference", "grouped", "dense"):
            for k in (1, 2, E):
                layer = _layer(router, options)
                _record(
                    out,
                    f"{setup}/{backend}/k{k}",
                    layer,
                    x,
                    lambda x, layer=layer, k=k, b=backend: layer(
                        x, top_k=k, backend=b, return_details=True
                    ),
                )
            layer = _layer(router, options)
            _record(
                out,
                f"{setup}/{backend}/mask",
                layer,
                x,
                lambda x, layer=layer, b=backend: layer(
                    x, top_k=3, backend=b, mask=mask, return_details=True
                ),
            )
            if router != "dense":
                layer = _layer(router, options, capacity_factor=0.5)
                _record(
                    out,
                    f"{setup}/{backend}/capacity_k1",
                    layer,
                    x,
                    lambda x, layer=layer, b=backend: layer(
                        x, top_k=1, backend=b, return_details=True
                    ),
                )
    for router in ("hyperrouter", "smoe_dropout"):
        torch.manual_seed(3)
        model = TransformerXL(
            50,
            ModelConfig(n_layer=2, n_head=2, d_head=8, d_model=16, d_inner=32, dropout=0.0),
            MoEConfig(layers=[0, 1], num_experts=4, d_expert=16, router=router),
            mem_len=6,
            top_k=2,
        )
        data = torch.randint(0, 50, (7, 3))
        target = torch.randint(0, 50, (7, 3))
        res = model(data, target)
        res2 = model(data, target, res.mems)
        (res.loss + res2.loss + res2.aux_loss).backward()
        out[f"txl/{router}/loss"] = torch.stack([res.loss.detach(), res2.loss.detach()])
        for name, p in model.named_parameters():
            if p.grad is not None:
                out[f"txl/{router}/grad/{name}"] = p.grad
    return {k: v.detach().contiguous() for k, v in out.items()}


def _digest(t: torch.Tensor) -> dict:
    data = t.cpu().contiguous()
    sha = hashlib.sha256(str((data.dtype, tuple(data.shape))).encode())
    sha.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return {"sha256": sha.hexdigest(), "norm": float(data.double().norm())}


if os.environ.get("HYPERROUTER_WRITE_FIXTURE") == "1":  # pragma: no cover
    FIXTURE.parent.mkdir(exist_ok=True)
    digests = {k: _digest(v) for k, v in sorted(_cases().items())}
    FIXTURE.write_text(json.dumps(digests, indent=0) + "\n")


def test_original_routers_are_bit_identical_to_the_stored_fixture() -> None:
    expected = json.loads(FIXTURE.read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the fixture's: CPU matmuls split their sums by thread count
    try:
        got = {k: _digest(v) for k, v in _cases().items()}
    finally:
        torch.set_num_threads(threads)
    assert sorted(got) == sorted(expected)
    different = [
        f"{k} (norm {got[k]['norm']:.9g} vs {expected[k]['norm']:.9g})"
        for k in expected
        if got[k]["sha256"] != expected[k]["sha256"]
    ]
    assert not different, f"{len(different)} tensors changed, first: {different[:5]}"
