"""Transformer-XL: attention against its formula, recurrence, adaptive softmax, MoE control."""

from __future__ import annotations

import math

import pytest
import torch

from hyperrouter.models import ModelConfig, MoEConfig, TransformerXL
from hyperrouter.models.adaptive import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax
from hyperrouter.models.transformer_xl import PositionalEmbedding, RelPartialLearnableAttention

SMALL = dict(n_layer=2, n_head=2, d_head=8, d_model=16, d_inner=32, dropout=0.1)


def make_model(n_token=40, moe_layers=(0, 1), router="hyperrouter", mem_len=8, **model_kw):
    torch.manual_seed(0)
    moe = MoEConfig(layers=list(moe_layers), num_experts=4, d_expert=8, router=router)
    return TransformerXL(n_token, ModelConfig(**{**SMALL, **model_kw}), moe, 8, mem_len, top_k=2)


def test_attention_matches_the_relative_position_formula() -> None:
    torch.manual_seed(0)
    n_head, d_head, d_model, qlen, mlen, bsz = 2, 4, 8, 5, 3, 2
    klen = qlen + mlen
    att = RelPartialLearnableAttention(n_head, d_model, d_head, 0.0, 0.0).eval()
    w, mems = torch.randn(qlen, bsz, d_model), torch.randn(mlen, bsz, d_model)
    u, v = torch.randn(n_head, d_head), torch.randn(n_head, d_head)
    pos = PositionalEmbedding(d_model)(torch.arange(klen - 1, -1, -1.0))
    mask = torch.triu(torch.ones(qlen, klen, dtype=torch.bool), diagonal=1 + mlen)
    out = att(w, pos, u, v, mask, mems)

    heads = att.qkv_net(torch.cat([mems, w])).view(klen, bsz, 3, n_head, d_head)
    q, k, val = heads[mlen:, :, 0], heads[:, :, 1], heads[:, :, 2]
    r = att.r_net(pos[:, 0]).view(klen, n_head, d_head)  # row m encodes distance klen-1-m
    ref = torch.zeros(qlen, bsz, n_head, d_head)
    for i in range(qlen):
        for b in range(bsz):
            for h in range(n_head):
                keys = range(mlen + i + 1)  # causal: memory and positions up to i
                scores = torch.stack(
                    [
                        (
                            (q[i, b, h] + u[h]) @ k[j, b, h]
                            + (q[i, b, h] + v[h]) @ r[klen - 1 - (mlen + i - j), h]
                        )
                        / math.sqrt(d_head)
                        for j in keys
                    ]
                )
                ref[i, b, h] = torch.softmax(scores, 0) @ val[: mlen + i + 1, b, h]
    expected = att.layer_norm(w + att.o_net(ref.reshape(qlen, bsz, -1)))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["dense", "moe", "adaptive"])
def test_second_segment_with_memory_equals_one_long_pass(variant: str) -> None:
    kwargs = {}
    layers = (0, 1)
    if variant == "dense":
        layers = ()
    if variant == "adaptive":
        kwargs = dict(adaptive=True, cutoffs=[10, 25], div_val=2)
    model = make_model(moe_layers=layers, mem_len=8, **kwargs).eval()
    data = torch.randint(0, 40, (16, 3))
    full = model.log_probs(data)
    first = model(data[:8])
    second = model.log_probs(data[8:], first.mems)
    torch.testing.assert_close(second, full[8:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.log_probs(data[:8]), full[:8], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("div_val", [1, 2])
def test_adaptive_softmax_is_a_distribution_and_nll_matches(div_val: int) -> None:
    torch.manual_seed(0)
    emb = AdaptiveEmbedding(50, 16, 12, [10, 30], div_val)
    crit = ProjectedAdaptiveLogSoftmax(50, 16, 12, [10, 30], div_val)
    for p in [*emb.parameters(), *crit.parameters()]:
        torch.nn.init.normal_(p, 0.0, 0.3)
    crit.tie_to(emb)
    hidden, target = torch.randn(64, 12), torch.randint(0, 50, (64,))
    log_prob = crit.log_prob(hidden)
    torch.testing.assert_close(log_prob.exp().sum(-1), torch.ones(64), rtol=1e-5, atol=1e-5)
    nll = crit(hidden, target)
    torch.testing.assert_close(nll, -log_prob.gather(1, target[:, None]).squeeze(1))
    assert emb(torch.randint(0, 50, (3, 4))).shape == (3, 4, 12)
    with pytest.raises(ValueError, match="cutoffs"):
        ProjectedAdaptiveLogSoftmax(50, 16, 12, [30, 10])


def test_top_k_control_and_losses() -> None:
    model = make_model(router="smoe")
    model.set_top_k(3)
    assert [m.top_k for m in model.moe_layers()] == [3, 3] and model.top_k == 3
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 4\]"):
        model.set_top_k(5)
    data = torch.randint(0, 40, (8, 2))
    out = model(data, data)
    assert out.loss.shape == () and out.nll.shape == (8, 2) and len(out.moe_stats) == 2
    assert len(out.mems) == SMALL["n_layer"] + 1
    with pytest.raises(ValueError, match="moe.layers must be layer indices"):
        make_model(moe_layers=(0, 5))


def test_router_keeps_its_own_initialisation() -> None:
    model = make_model(router="hyperrouter")
    router = model.moe_layers()[0].router
    assert abs(router.embedding.std().item() - 1.0) < 0.5  # N(0, 1), not the model's N(0, 0.02)
    assert not any(p.requires_grad for p in router.hypernet.parameters())
