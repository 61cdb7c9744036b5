"""The contract every registered router keeps, run over the whole registry with default options.

Shapes of its `Routing`; the MoE layer's output and the gradients of the input and of every
trainable parameter against a naive per-token loop over the router's own routing (relative error
<= 1e-5 in fp32; for routers that require the `merge` dispatch, one expert with the weighted
mean of the experts' parameters per token); k changing between calls; eval determinism; a
state_dict round trip; a padding mask; an empty batch. A router registered later is covered
without touching this file.
Every call gets token ids and sequence ids, as Transformer-XL and the classifier give them.
"""

from __future__ import annotations

import pytest
import torch

from hyperrouter import MoE
from hyperrouter.params import trainable_parameters
from hyperrouter.routers import ROUTERS, RoutingContext

E, D, H, T = 8, 16, 24, 24
VOCAB = 50
NAMES = sorted(ROUTERS)


def ids_for(lead: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Token ids (a fixed pattern over a vocabulary of VOCAB) and sequence ids for x.shape[:-1]."""
    n = int(torch.Size(lead).numel())
    token_ids = (torch.arange(n) * 7 % VOCAB).reshape(lead)
    sequence_ids = (torch.arange(n) // 5).reshape(lead)
    return {"token_ids": token_ids, "sequence_ids": sequence_ids}


def make(name: str, seed: int = 0, **kwargs) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(D, E, H, 2, router=name, **kwargs)
    with torch.no_grad():
        for pname, p in layer.experts.named_parameters():
            p.normal_(0.0, 0.3 if pname.startswith("w_") else 0.1)
    return layer


def naive_expert(layer: MoE, e: int, x_D: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    return torch.relu(x_D @ ex.w_in[e] + ex.b_in[e]) @ ex.w_out[e] + ex.b_out[e]


def naive_merged_expert(layer: MoE, routing, keep, t: int, x_D: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    w = torch.zeros(E)
    for j in range(routing.expert_ids.shape[1]):
        if keep is None or keep[t, j]:
            w = w + routing.weights[t, j] * torch.eye(E)[int(routing.expert_ids[t, j])]
    w_in, b_in = torch.einsum("e,edh->dh", w, ex.w_in), w @ ex.b_in
    w_out, b_out = torch.einsum("e,ehd->hd", w, ex.w_out), w @ ex.b_out
    return torch.relu(x_D @ w_in + b_in) @ w_out + b_out


def layer_loss(layer: MoE, x: torch.Tensor, k: int, g: torch.Tensor):
    out = layer(x, top_k=k, return_details=True, **ids_for(x.shape[:-1]))
    loss = (out.output * g).sum() + sum(out.aux_losses.values(), torch.zeros(()))
    return out.output, loss


def naive_loss(layer: MoE, x: torch.Tensor, k: int, g: torch.Tensor):
    if layer.router.uses_all_experts:
        k = E
    ctx = RoutingContext(top_k=k, training=layer.training, **ids_for(x.shape[:-1]))
    routing = layer.router(x, ctx)
    keep = routing.keep
    rows = []
    for t in range(x.shape[0]):
        row = torch.zeros(D)
        if layer.router.dispatch == "merge":  # one expert with the weighted mean of parameters
            row = naive_merged_expert(layer, routing, keep, t, x[t])
            rows.append(row)
            continue
        for j in range(routing.expert_ids.shape[1]):
            if keep is None or keep[t, j]:
                e = int(routing.expert_ids[t, j])
                row = row + routing.weights[t, j] * naive_expert(layer, e, x[t])
        rows.append(row)
    out = torch.stack(rows) if rows else torch.zeros(0, D)
    loss = (out * g).sum() + sum(routing.aux_losses.values(), torch.zeros(()))
    return out, loss


def grads(layer: MoE, x: torch.Tensor, fn, k: int, g: torch.Tensor):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(7)  # the same draws for stochastic routers in both paths
    out, loss = fn(layer, x, k, g)
    loss.backward()
    params = trainable_parameters(layer)
    return out.detach(), [x.grad] + [
        p.grad if p.grad is not None else torch.zeros_like(p) for p in params
    ]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if b.norm() == 0:
        return a.norm().item()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 2])
def test_output_and_every_gradient_match_a_naive_loop(name: str, k: int) -> None:
    layer = make(name).train()
    torch.manual_seed(1)
    x, g = torch.randn(T, D), torch.randn(T, D)
    for backend in ("grouped", "reference"):
        layer.backend = backend
        out, got = grads(layer, x, layer_loss, k, g)
        ref, want = grads(layer, x, naive_loss, k, g)
        assert rel_err(out, ref) <= 1e-5, backend
        for i, (a, b) in enumerate(zip(got, want)):
            assert rel_err(a, b) <= 1e-5, (backend, i)


@pytest.mark.parametrize("name", NAMES)
def test_routing_shapes_and_k_changes_between_calls(name: str) -> None:
    layer = make(name).eval()
    x = torch.randn(T, D)
    ids = ids_for((T,))
    for k in (1, 3, 2):
        routing = layer.router(x, RoutingContext(top_k=k, training=False, **ids))
        slots = routing.expert_ids.shape[1]
        assert routing.expert_ids.shape == routing.weights.shape == (T, slots)
        assert routing.expert_ids.dtype == torch.long
        assert int(routing.expert_ids.min()) >= 0 and int(routing.expert_ids.max()) < E
        if routing.logits is not None:
            assert routing.logits.shape == (T, E)
        if routing.keep is not None:
            assert routing.keep.shape == (T, slots) and routing.keep.dtype == torch.bool
        out = layer(x, top_k=k, return_details=True, **ids)
        assert out.output.shape == (T, D)
        assert out.stats.top_k == (E if layer.router.uses_all_experts else k)
        assert int(out.stats.tokens_per_expert.sum()) <= T * slots


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_deterministic_and_state_dict_round_trips(name: str) -> None:
    layer = make(name, seed=0)
    x = torch.randn(T, D)
    ids = ids_for((T,))
    layer.train()
    layer(x, **ids)  # a training call first: eval must not depend on training-time randomness
    layer.eval()
    first, second = layer(x, **ids), layer(x, **ids)
    assert torch.equal(first, second)
    other = make(name, seed=123).eval()
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x, **ids), first)


@pytest.mark.parametrize("name", NAMES)
def test_padding_is_not_routed(name: str) -> None:
    layer = make(name).eval()
    x = torch.randn(3, 8, D)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 2:] = False
    ids = ids_for((3, 8))
    out = layer(x, mask=mask, return_details=True, **ids)
    assert torch.equal(out.output[~mask], torch.zeros(int((~mask).sum()), D))
    real = layer(x[mask], return_details=True, **{n: v[mask] for n, v in ids.items()})
    torch.testing.assert_close(out.output[mask], real.output, rtol=1e-6, atol=1e-6)
    assert torch.equal(out.stats.tokens_per_expert, real.stats.tokens_per_expert)


@pytest.mark.parametrize("name", NAMES)
def test_an_empty_batch_behaves_like_any_other(name: str) -> None:
    for mode in ("train", "eval"):
        layer = make(name)
        getattr(layer, mode)()
        x = torch.zeros(0, D, requires_grad=True)
        out = layer(x, return_details=True, **ids_for((0,)))
        assert out.output.shape == (0, D)
        loss = out.output.sum() + sum(out.aux_losses.values(), torch.zeros(()))
        loss.backward()
        assert x.grad is not None and x.grad.shape == (0, D)
        padded = torch.randn(2, 3, D, requires_grad=True)
        everything_masked = layer(
            padded, mask=torch.zeros(2, 3, dtype=torch.bool), **ids_for((2, 3))
        )
        everything_masked.sum().backward()
        assert torch.equal(padded.grad, torch.zeros(2, 3, D))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("training", [False, True])
def test_router_math_is_fp32_under_bf16_autocast(name: str, training: bool) -> None:
    """Under bf16 autocast every router routes exactly as in fp32 (the layer runs routers in full
    precision): the same experts, the same fp32 combine weights and logits."""
    layer = make(name).train(training)
    x = torch.randn(3, 8, D)
    outs = []
    for autocast in (False, True):
        torch.manual_seed(5)  # routers that sample draw the same numbers
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs.append(layer(x, top_k=2, return_details=True, **ids_for(x.shape[:-1])).routing)
        layer.zero_grad(set_to_none=True)
    fp32, bf16 = outs
    assert torch.equal(bf16.expert_ids, fp32.expert_ids)
    assert bf16.weights.dtype == torch.float32 and torch.equal(bf16.weights, fp32.weights)
    if fp32.logits is not None:
        assert bf16.logits.dtype == torch.float32 and torch.equal(bf16.logits, fp32.logits)
