"""The logit routers against their papers' formulas, written per token in plain Python floats.

The contract suite (test_router_contract.py) builds its naive reference from each router's own
`Routing`, so it checks dispatch and combine, not the router's math. Here nothing of the router's
code computes the expected values: the probabilities, the experts chosen and the combine weights
come from the formula applied token by token to the router's parameters (float64, so the only
difference is rounding). A changed score function, a lost bias or a renormalisation where the
paper has none fails here.
"""

from __future__ import annotations

import math

import pytest
import torch

from hyperrouter import MoE

D, E, T = 6, 5, 11


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [v / total for v in exps]


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def linear(x: list[float], weight: torch.Tensor, bias: torch.Tensor | None) -> list[float]:
    rows = weight.tolist()
    b = [0.0] * len(rows) if bias is None else bias.tolist()
    return [sum(w * xi for w, xi in zip(row, x)) + b[e] for e, row in enumerate(rows)]


def best(scores: list[float], k: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda e: -scores[e])[:k]


def hyper_weights(router) -> tuple[torch.Tensor, torch.Tensor]:
    """HyperRouter's generated router W [E, D] and b [E]: h = relu(A e + a), g = B h + b0."""
    first, second = router.hypernet[0], router.hypernet[2]
    emb = router.embedding[0].tolist()
    hidden = [max(0.0, v) for v in linear(emb, first.weight.detach(), first.bias.detach())]
    out = linear(hidden, second.weight.detach(), second.bias.detach())
    rows = [out[e * (D + 1) : (e + 1) * (D + 1)] for e in range(E)]
    f64 = torch.float64
    return torch.tensor([r[:D] for r in rows], dtype=f64), torch.tensor(
        [r[D] for r in rows], dtype=f64
    )


def expected(name: str, router, x: list[float], k: int) -> dict[int, float]:
    """{expert: combine weight} of one token, from the paper's formula."""
    if name in ("smoe", "smoe_dropout", "hyperrouter"):
        # top-k of the logits, softmax over the k chosen logits (the HyperRouter reference rule)
        if name == "hyperrouter":
            weight, bias = hyper_weights(router)
        else:
            weight, bias = router.gate.weight.detach(), router.gate.bias.detach()
        logits = linear(x, weight, bias)
        chosen = best(logits, k)
        return dict(zip(chosen, softmax([logits[e] for e in chosen])))
    if name == "switch":  # softmax over all E, the k most probable, their probabilities
        probs = softmax(linear(x, router.gate.weight.detach(), None))
        chosen = best(probs, k)
        return {e: probs[e] for e in chosen}
    if name == "gshard":  # softmax over all E, the top 2 (k), renormalised over them
        probs = softmax(linear(x, router.gate.weight.detach(), None))
        chosen = best(probs, k)
        total = sum(probs[e] for e in chosen)
        return {e: probs[e] / total for e in chosen}
    if name == "aux_free":  # sigmoid scores; choice by score + bias; weights renormalised scores
        scores = [sigmoid(v) for v in linear(x, router.gate.weight.detach(), None)]
        bias = router.expert_bias.tolist()
        chosen = best([s + b for s, b in zip(scores, bias)], k)
        total = sum(scores[e] for e in chosen)
        return {e: scores[e] / total for e in chosen}
    if name == "xmoe":  # cos(W_red x, e_i) / tau, softmax over E, the k most probable
        z = linear(x, router.reduction.weight.detach(), None)
        z_norm = math.sqrt(sum(v * v for v in z))
        tau = float(router.temperature.detach())
        logits = []
        for emb in router.expert_embeddings.detach().tolist():
            e_norm = math.sqrt(sum(v * v for v in emb))
            logits.append(sum(a * b for a, b in zip(z, emb)) / (z_norm * e_norm) / tau)
        probs = softmax(logits)
        chosen = best(probs, k)
        return {e: probs[e] for e in chosen}
    raise AssertionError(name)


OPTIONS = {
    "smoe": {},
    "smoe_dropout": {},
    "hyperrouter": {"hyper_hidden": 16},
    "switch": {"capacity_factor": None, "eval_capacity_factor": None},
    "gshard": {"capacity_factor": None, "eval_capacity_factor": None},
    "aux_free": {},
    "xmoe": {"low_dim": 4},
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_logit_router_matches_the_per_token_formula(name: str, k: int) -> None:
    torch.manual_seed(0)
    layer = MoE(D, E, 8, k, router=name, router_options=OPTIONS[name]).double().eval()
    with torch.no_grad():  # biases away from 0, so a lost bias shows
        for module in layer.router.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.3)
        if name == "aux_free":
            layer.router.expert_bias.copy_(torch.linspace(-0.05, 0.05, E))
        if name == "hyperrouter":
            layer.router.hypernet[2].weight.mul_(30)  # logits of order 1, not 0.02
    x = torch.randn(T, D, dtype=torch.float64)
    with torch.no_grad():
        routing = layer(x, return_details=True).routing
    for t in range(T):
        want = expected(name, layer.router, x[t].tolist(), k)
        got = {
            int(e): float(w)
            for e, w, kept in zip(
                routing.expert_ids[t],
                routing.weights[t],
                routing.keep[t] if routing.keep is not None else [True] * k,
            )
            if kept
        }
        assert set(got) == set(want), (t, got, want)
        for e, w in want.items():
            assert got[e] == pytest.approx(w, rel=1e-12, abs=1e-15), (t, e)
