"""torch.compile of the attention blocks: the same outputs and gradients as eager (fp32, 1e-5
relative), state_dict unchanged; skipped with the reason where this torch cannot compile."""

from __future__ import annotations

import copy

import pytest
import torch

from hyperrouter.models.transformer_xl import can_compile
from hyperrouter.train.config import load_config
from tests.conftest import TINY_MOE

TINY = [*TINY_MOE, "eval.top_ks=[1,4]", "model.dropout=0.0", "model.dropatt=0.0"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_compiled_attention_matches_eager() -> None:
    if not can_compile():
        pytest.skip("torch.compile is not available with this torch/toolchain")
    torch.manual_seed(0)
    eager = load_config("quick", TINY).build_model(30)
    eager.mem_len = 8
    compiled = copy.deepcopy(eager)
    assert compiled.compile_attention()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    data = torch.randint(0, 30, (9, 3))
    inp, target = data[:-1], data[1:]
    eager.eval(), compiled.eval()
    with torch.no_grad():
        mems_e = eager(inp, target).mems
        mems_c = compiled(inp, target).mems
        for m_e, m_c in zip(mems_e, mems_c):
            assert rel(m_c, m_e) <= 1e-5
        out_e = eager(inp, target, mems_e)  # with memory: another shape
        out_c = compiled(inp, target, mems_c)
    assert rel(out_c.nll, out_e.nll) <= 1e-5
    eager.train(), compiled.train()  # (no dropout anywhere: model.dropout = dropatt = 0)
    grads = []
    for model, mems in ((eager, mems_e), (compiled, mems_c)):
        model.zero_grad(set_to_none=True)
        model(inp, target, mems).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    errors = {name: rel(grads[1][name], g) for name, g in grads[0].items()}
    assert max(errors.values()) <= 1e-5, errors
