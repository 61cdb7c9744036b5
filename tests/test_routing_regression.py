"""Routing API v2 keeps the original routers' results.

`tests/fixtures/routing_v1.safetensors` holds every tensor computed by `_cases()`: outputs,
auxiliary losses, routing statistics and the gradients of the input and every parameter, for the
four original routers, every backend, several k, with and without a capacity limit (k = 1, where
first-come-first-served and first-choice-first priority agree) and a padding mask; plus a small
Transformer-XL's loss and gradients. The values were written from the code before the routing
interface v2 (6f6b0ef; until 2026-12-06 the fixture held SHA-256 digests of the same tensors, and
the stored values reproduce every one of them).

On the machine that wrote the fixture (same CPU capability and flags, torch build and thread
count: the stored fingerprint) every tensor must be bit-identical. Elsewhere the CPU kernels split
and order their fp32 sums differently (AVX-512 vs AVX2 matmuls, another torch build), so values
differ in the last bits; there the test compares at a stated tolerance (`RTOL`, `ATOL`), which is
far below what any change of routing or formula produces (`test_a_changed_formula_is_caught`).
Regenerate only on purpose: HYPERROUTER_WRITE_FIXTURE=1.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from hyperrouter import MoE
from hyperrouter.models.transformer_xl import ModelConfig, MoEConfig, TransformerXL
from hyperrouter.routers.linear import LinearRouter

FIXTURE = Path(__file__).parent / "fixtures" / "routing_v1.safetensors"
E, D, H = 8, 16, 24
THREADS = 2  # CPU matmuls split their sums by thread count: the fixture's count, always
# Tolerance off the fixture's machine. Measured 2026-12-06: the same code under AVX2 kernels
# (ATEN_CPU_CAPABILITY=avx2) against the AVX-512 fixture differs by at most a few 1e-7 relative
# to each tensor's largest value (float32 eps is 1.2e-7; about ten fp32 ops deep). 1e-5 leaves
# room for another torch build; a changed formula or one flipped expert moves values by > 1e-3.
RTOL = 1e-5
ATOL = 1e-5  # times the largest magnitude in the expected tensor (gradients reach ~1e-9 at k=1)
SETUPS = {
    "smoe": ("smoe", {}),
    "smoe_losses": ("smoe", {"balance_loss_weight": 0.01, "z_loss_weight": 0.001}),
    "smoe_dropout": ("smoe_dropout", {}),
    "hyperrouter": ("hyperrouter", {"hyper_hidden": 32}),
    "dense": ("dense", {}),
    "dense_uniform": ("dense", {"weighting": "uniform"}),
    "dense_hyper": ("dense", {"base": "hyperrouter", "base_options": {"hyper_hidden": 32}}),
}


def fingerprint() -> dict[str, str]:
    """What decides the float bits of CPU kernels: torch build, CPU capability, flags, threads."""
    flags = model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = " ".join(sorted(value.split()))
            if key.strip() == "model name" and not model:
                model = value.strip()
    except OSError:
        pass
    return {
        "torch": f"{torch.__version__} {torch.version.git_version}",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "cpu_model": model,
        "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest(),
        "threads": str(THREADS),
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


def _record(out: dict, prefix: str, layer: MoE, x: torch.Tensor, call: Callable) -> None:
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


def _layer_cases(out: dict, setups: dict) -> None:
    torch.manual_seed(2)
    x = torch.randn(3, 9, D)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 6:] = False
    mask[2, 3:] = False
    for setup, (router, options) in setups.items():
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


def _model_cases(out: dict) -> None:
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


def _cases(setups: dict | None = None, model: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of the fixture (or those of `setups` only), computed on `THREADS` threads."""
    out: dict[str, torch.Tensor] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        _layer_cases(out, SETUPS if setups is None else setups)
        if model:
            _model_cases(out)
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().contiguous() for k, v in out.items()}


def mismatches(got: dict, expected: dict, exact: bool) -> list[str]:
    """Names (with the size of the difference) of the tensors of `expected` that `got` does not
    reproduce: bit for bit when `exact`, else within RTOL and ATOL x the tensor's largest value."""
    bad = []
    for name, want in expected.items():
        have = got.get(name)
        if have is None or have.shape != want.shape or have.dtype != want.dtype:
            bad.append(f"{name} (missing or another shape/dtype)")
            continue
        if exact:
            if not torch.equal(have, want):
                bad.append(f"{name} (not bit-identical)")
            continue
        have, want = have.double(), want.double()
        scale = float(want.abs().max()) if want.numel() else 0.0
        err = (have - want).abs()
        if bool((err > ATOL * max(scale, 1e-30) + RTOL * want.abs()).any()):
            bad.append(f"{name} (max |diff| {float(err.max()):.3g}, scale {scale:.3g})")
    return bad


def _expected() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(FIXTURE, "pt") as f:
        meta = f.metadata() or {}
    return load_file(FIXTURE), json.loads(meta.get("fingerprint", "{}"))


if os.environ.get("HYPERROUTER_WRITE_FIXTURE") == "1":  # pragma: no cover
    FIXTURE.parent.mkdir(exist_ok=True)
    save_file(_cases(), FIXTURE, metadata={"fingerprint": json.dumps(fingerprint())})


def test_original_routers_match_the_stored_fixture() -> None:
    expected, written_on = _expected()
    got = _cases()
    assert sorted(got) == sorted(expected)
    exact = written_on == fingerprint()
    bad = mismatches(got, expected, exact)
    how = "bit-identical (same machine fingerprint)" if exact else f"within rtol {RTOL}"
    assert not bad, f"{len(bad)} of {len(expected)} tensors not {how}, first: {bad[:5]}"


@pytest.mark.parametrize(
    "change", ["logits scaled by 1.001", "second choice for the first", "bias ignored"]
)
def test_a_changed_formula_is_caught(change: str, monkeypatch) -> None:
    """The comparison off the fixture's machine still sees a real change: a formula off by 0.1%,
    one flipped expert choice, a dropped term."""
    original = LinearRouter.compute_logits

    def changed(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits = original(self, x_TD)
        if change == "logits scaled by 1.001":
            return logits * 1.001
        if change == "bias ignored":
            return logits - self.gate.bias
        top2 = logits.topk(2, dim=-1).indices  # swap the two best experts of the first token
        logits = logits.clone()
        first, second = logits[0, top2[0, 0]].clone(), logits[0, top2[0, 1]].clone()
        logits[0, top2[0, 0]], logits[0, top2[0, 1]] = second, first
        return logits

    expected, _ = _expected()
    setups = {"smoe": SETUPS["smoe"]}
    assert not mismatches(_cases(setups, model=False), _select(expected, "smoe/"), exact=False)
    monkeypatch.setattr(LinearRouter, "compute_logits", changed)
    got = _cases(setups, model=False)
    bad = mismatches(got, _select(expected, "smoe/"), exact=False)
    assert len(bad) >= 5, bad


def _select(tensors: dict, prefix: str) -> dict:
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}
