"""The MoE layer against a naive per-token reference: router x backend x k, forward and grads."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from hyperrouter import HyperRouterError, MoE, parameter_summary
from hyperrouter.params import trainable_parameters
from hyperrouter.routers.losses import router_z_loss, switch_balance_loss

E, D, H = 8, 16, 24
ROUTER_SETUPS = {
    "smoe": {},
    "smoe_dropout": {},
    "hyperrouter": {"hyper_hidden": 32},
    "dense": {},
    "dense_uniform": {"weighting": "uniform"},
    "dense_hyper": {"base": "hyperrouter", "base_options": {"hyper_hidden": 32}},
}
BACKENDS = ["reference", "grouped", "grouped_mm", "dense"]
KS = [1, 2, 3, E]


def make_layer(setup: str, top_k: int = 2, **kwargs) -> MoE:
    router = "dense" if setup.startswith("dense") else setup
    torch.manual_seed(0)
    layer = MoE(D, E, H, top_k, router=router, router_options=ROUTER_SETUPS[setup], **kwargs)
    with torch.no_grad():  # O(1) activations and non-zero biases, so every gradient is exercised
        for name, p in layer.experts.named_parameters():
            p.normal_(0.0, 0.3 if name.startswith("w_") else 0.1)
        for module in layer.router.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.1)
    return layer


# ----------------------------------------------------------------------------- naive reference


def naive_logits(layer: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    router = layer.router
    if hasattr(router, "base"):
        if router.base is None:
            return torch.zeros(x_TD.shape[0], E)
        router = router.base
    if hasattr(router, "hypernet"):
        first, second = router.hypernet[0], router.hypernet[2]
        hidden = torch.relu(router.embedding @ first.weight.T + first.bias)
        generated = (hidden @ second.weight.T + second.bias).reshape(E, D + 1)
        weight, bias = generated[:, :D], generated[:, D]
    else:
        weight, bias = router.gate.weight, router.gate.bias
    return x_TD @ weight.T + bias


def naive_expert(layer: MoE, e: int, x_D: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    h = x_D @ ex.w_in[e] + ex.b_in[e]
    if ex.activation == "relu":
        a = torch.relu(h)
    elif ex.activation == "gelu":
        a = torch.nn.functional.gelu(h)
    else:
        a = torch.nn.functional.silu(h[:H]) * h[H:]
    return a @ ex.w_out[e] + ex.b_out[e]


def naive_moe(layer: MoE, x: torch.Tensor, k: int) -> torch.Tensor:
    """Per token: sort the logits, take the top k, softmax over them, sum the weighted experts."""
    x_TD = x.reshape(-1, D)
    logits = naive_logits(layer, x_TD)
    if layer.router.uses_all_experts:
        k = E
    rows = []
    for t in range(x_TD.shape[0]):
        chosen = sorted(range(E), key=lambda e: -logits[t, e].item())[:k]
        weights = torch.softmax(torch.stack([logits[t, e] for e in chosen]), dim=0)
        rows.append(sum(w * naive_expert(layer, e, x_TD[t]) for w, e in zip(weights, chosen)))
    return torch.stack(rows).reshape(x.shape)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def outputs_and_grads(layer: MoE, x: torch.Tensor, fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    torch.manual_seed(1)
    (out * torch.randn_like(out)).sum().backward()
    params = trainable_parameters(layer)
    grads = [x.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    return out.detach(), grads


def check_against_naive(layer: MoE, x: torch.Tensor, k: int, backend: str) -> None:
    out, grads = outputs_and_grads(layer, x, lambda x: layer(x, top_k=k, backend=backend))
    ref_out, ref_grads = outputs_and_grads(layer, x, lambda x: naive_moe(layer, x, k))
    assert rel_err(out, ref_out) <= 1e-5
    for g, r in zip(grads, ref_grads):
        if r.norm() == 0:
            assert g.norm() == 0
        else:
            assert rel_err(g, r) <= 1e-5


@pytest.mark.parametrize("setup,backend,k", list(itertools.product(ROUTER_SETUPS, BACKENDS, KS)))
def test_every_router_backend_k_matches_naive(setup: str, backend: str, k: int) -> None:
    layer = make_layer(setup)
    torch.manual_seed(2)
    check_against_naive(layer, torch.randn(2, 7, D), k, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_activations_match_naive(backend: str, activation: str) -> None:
    layer = make_layer("smoe", activation=activation)
    torch.manual_seed(3)
    check_against_naive(layer, torch.randn(11, D), 2, backend)


@pytest.mark.parametrize("setup", ["smoe", "hyperrouter"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_and_unused_expert(setup: str, backend: str) -> None:
    layer = make_layer(setup)
    with torch.no_grad():  # expert 3 can never win: its router bias is hugely negative
        if setup == "smoe":
            layer.router.gate.bias[3] = -1e4
        else:
            layer.router.hypernet[2].bias[3 * (D + 1) + D] = -1e4
    torch.manual_seed(4)
    for x in (torch.randn(1, D), torch.randn(1, 1, D), torch.randn(3, 4, D)):
        for k in (1, 2, E - 1):
            check_against_naive(layer, x, k, backend)
    x = torch.randn(5, D)
    _, ref_grads = outputs_and_grads(layer, x, lambda x: naive_moe(layer, x, 2))
    _, grads = outputs_and_grads(layer, x, lambda x: layer(x, top_k=2, backend=backend))
    assert grads[0] is not None and grads[0].abs().sum() > 0  # the input gradient exists...
    assert rel_err(grads[0], ref_grads[0]) <= 1e-5  # ...and is right
    # outputs_and_grads leaves the backend's .grad in place: expert 3 got no token, so its
    # weights get exactly zero gradient while the experts that were used get some
    ex = layer.experts
    for p in (ex.w_in, ex.b_in, ex.w_out, ex.b_out):
        assert p.grad is not None
        assert torch.count_nonzero(p.grad[3]) == 0
        assert p.grad.abs().sum() > 0


def test_one_expert_equals_dense_ffn() -> None:
    torch.manual_seed(5)
    layer = MoE(D, 1, H, 1, router="smoe")
    ffn = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D))
    with torch.no_grad():
        ffn[0].weight.copy_(layer.experts.w_in[0].T)
        ffn[0].bias.copy_(torch.randn(H))
        layer.experts.b_in[0].copy_(ffn[0].bias)
        ffn[2].weight.copy_(layer.experts.w_out[0].T)
        ffn[2].bias.copy_(torch.randn(D))
        layer.experts.b_out[0].copy_(ffn[2].bias)
    x = torch.randn(3, 5, D)
    for backend in BACKENDS:
        torch.testing.assert_close(layer(x, backend=backend), ffn(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setup", ["smoe_dropout", "hyperrouter"])
def test_frozen_parameters_never_change(setup: str) -> None:
    layer = make_layer(setup)
    frozen = {n: p.detach().clone() for n, p in layer.named_parameters() if not p.requires_grad}
    assert frozen, "the router must have frozen parameters"
    trainable_before = {
        n: p.detach().clone() for n, p in layer.named_parameters() if p.requires_grad
    }
    opt = torch.optim.Adam(trainable_parameters(layer), lr=1e-2)
    for _ in range(3):
        out = layer(torch.randn(6, D), top_k=2)
        out.square().mean().backward()
        for n, p in layer.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, n
        opt.step()
        opt.zero_grad()
    for n, p in layer.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    if setup == "hyperrouter":
        assert not torch.equal(layer.router.embedding, trainable_before["router.embedding"])
    summary = parameter_summary(layer)
    assert summary.frozen == sum(p.numel() for p in frozen.values())
    assert summary.total == sum(p.numel() for p in layer.parameters())
    state = layer.state_dict()
    assert all(n in state for n in frozen)


def test_hyperrouter_matches_reference_gate() -> None:
    """The reference HyperRouterGate: gate.weight/bias := hypernet(embedding)[0].reshape(E, -1)
    split into [:, :-1] and [:, -1]; topk(largest, unsorted) over the logits; softmax over them."""
    layer = make_layer("hyperrouter")
    router = layer.router
    x = torch.randn(20, D)
    generated = router.hypernet(router.embedding)[0].reshape([E, -1])
    gate = nn.Linear(D, E)
    del gate.weight, gate.bias
    gate.weight, gate.bias = generated[:, :-1], generated[:, -1]
    logits = gate(x)
    for k in (1, 2, 4, E):
        val, idx = torch.topk(logits, k=k, dim=-1, largest=True, sorted=False)
        score = torch.softmax(val.view(-1, k), dim=-1)
        routing = router(x, k)
        torch.testing.assert_close(routing.logits, logits, rtol=0, atol=0)
        ref = torch.zeros(20, E).scatter(1, idx, score)
        ours = torch.zeros(20, E).scatter(1, routing.expert_ids, routing.weights)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert router.embedding.shape == (1, D) and router.embedding.requires_grad
    assert router.hypernet[0].weight.shape == (32, D)
    assert router.hypernet[2].weight.shape == (E * (D + 1), 32)
    assert not any(p.requires_grad for p in router.hypernet.parameters())


def test_hyperrouter_defaults_and_init() -> None:
    torch.manual_seed(0)
    layer = MoE(256, 16, 32, router="hyperrouter")
    r = layer.router
    assert r.embedding.shape == (1, 256)
    assert r.hypernet[0].out_features == 256
    assert abs(r.embedding.std().item() - 1.0) < 0.15
    assert abs(r.hypernet[2].weight.std().item() - 0.02) < 0.002
    assert r.hypernet[2].bias.abs().sum() == 0
    small = MoE(256, 16, 32, router="hyperrouter", router_options={"embed_dim": 8})
    assert small.router.embedding.shape == (1, 8)


def test_eval_is_deterministic_and_k_changes_between_calls() -> None:
    layer = make_layer("hyperrouter", dropout=0.3).eval()
    x = torch.randn(4, 6, D)
    for backend in BACKENDS:
        assert torch.equal(layer(x, backend=backend), layer(x, backend=backend))
    for k in (1, 4, 2, E):
        layer.top_k = k
        torch.testing.assert_close(layer(x), naive_moe(layer, x, k), rtol=1e-5, atol=1e-6)
    assert layer(x, top_k=3).shape == x.shape and layer.top_k == E


def test_dropout_only_in_training() -> None:
    layer = make_layer("smoe", dropout=0.5)
    x = torch.randn(64, D)
    layer.train()
    assert not torch.equal(layer(x, backend="grouped"), layer(x, backend="grouped"))
    layer.eval()
    assert torch.equal(layer(x, backend="grouped"), layer(x, backend="grouped"))


def test_capacity_dropping_is_backend_independent() -> None:
    layer = make_layer("smoe", capacity_factor=0.5).eval()
    x = torch.randn(40, D)
    outs = {b: layer(x, top_k=2, backend=b, return_details=True) for b in BACKENDS}
    for b in BACKENDS[1:]:
        torch.testing.assert_close(outs[b].output, outs["reference"].output, rtol=1e-5, atol=1e-6)
    stats = outs["grouped"].stats
    capacity = math.ceil(40 * 2 / E * 0.5)
    assert stats.tokens_per_expert.max().item() <= capacity
    kept = stats.tokens_per_expert.sum().item()
    assert stats.dropped_fraction.item() == pytest.approx(1 - kept / 80)
    assert stats.dropped_fraction.item() > 0
    # no capacity: nothing dropped
    free = make_layer("smoe")(x, return_details=True).stats
    assert free.dropped_fraction.item() == 0 and free.tokens_per_expert.sum().item() == 80
    # gradients still match the reference backend when dropping
    layer.train()
    ref = outputs_and_grads(layer, x, lambda x: layer(x, backend="reference"))
    for b in ("grouped", "dense"):
        got = outputs_and_grads(layer, x, lambda x, b=b: layer(x, backend=b))
        for g, r in zip(got[1], ref[1]):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_padding_mask_excludes_tokens_everywhere() -> None:
    layer = make_layer("smoe")
    layer.router.balance_loss_weight = 1.0
    layer.router.z_loss_weight = 1.0
    x = torch.randn(2, 5, D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    out = layer(x, mask=mask, return_details=True)
    real = layer(x[mask], return_details=True)
    assert torch.equal(out.output[~mask], torch.zeros(3, D))
    torch.testing.assert_close(out.output[mask], real.output)
    for name in ("balance_loss", "z_loss"):
        torch.testing.assert_close(out.aux_losses[name], real.aux_losses[name])
    assert torch.equal(out.stats.tokens_per_expert, real.stats.tokens_per_expert)
    assert out.stats.tokens_per_expert.sum().item() == 7 * 2


def test_stats_and_aux_losses() -> None:
    layer = make_layer("smoe")
    out = layer(torch.randn(9, D), top_k=3, return_details=True)
    assert out.aux_losses == {}
    assert out.stats.tokens_per_expert.sum().item() == 27 and out.stats.top_k == 3
    assert 0 < out.stats.entropy.item() <= math.log(E)
    with_losses = make_layer("smoe")
    with_losses.router.balance_loss_weight = 0.01
    aux = with_losses(torch.randn(9, D), return_details=True).aux_losses
    assert set(aux) == {"balance_loss"} and aux["balance_loss"].requires_grad


def test_loss_formulas_on_known_cases() -> None:
    logits = torch.zeros(E * 4, E)
    ids = torch.arange(E).repeat(4).unsqueeze(1)
    assert switch_balance_loss(logits, ids).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, E)
    collapsed[:, 0] = 50.0
    assert switch_balance_loss(collapsed, torch.zeros(8, 1, dtype=torch.long)).item() == (
        pytest.approx(E)
    )
    assert router_z_loss(logits).item() == pytest.approx(math.log(E) ** 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_close_to_fp32(backend: str) -> None:
    layer = make_layer("smoe").eval()
    x = torch.randn(32, D)
    ref = layer(x, top_k=2, backend="reference")
    low = layer.to(torch.bfloat16)(x.to(torch.bfloat16), top_k=2, backend=backend)
    assert low.dtype == torch.bfloat16
    assert rel_err(low.float(), ref) < 3e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_matches_cpu_reference(backend: str, dtype: torch.dtype) -> None:
    """Every backend on CUDA (fp32, bf16, fp16), forward and input gradient, against the fp32 CPU
    reference with the same weights. Skipped on machines without a GPU."""
    layer = make_layer("smoe")
    x = torch.randn(64, D, requires_grad=True)
    ref = layer(x, top_k=2, backend="reference")
    ref.square().sum().backward()
    ref_grad = x.grad.clone()
    gpu = make_layer("smoe")
    gpu.load_state_dict(layer.state_dict())
    gpu = gpu.to("cuda", dtype)
    xg = x.detach().to("cuda", dtype).requires_grad_(True)
    out = gpu(xg, top_k=2, backend=backend)
    assert out.dtype == dtype and out.device.type == "cuda"
    out.float().square().sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert rel_err(out.float().cpu(), ref.detach()) < tol
    assert rel_err(xg.grad.float().cpu(), ref_grad) < tol


def test_bad_input_errors_name_the_problem() -> None:
    layer = make_layer("smoe")
    with pytest.raises(ValueError, match="unknown router 'nope'.*hyperrouter"):
        MoE(D, E, H, router="nope")
    with pytest.raises(ValueError, match="unknown backend 'fast'.*grouped"):
        MoE(D, E, H, backend="fast")
    with pytest.raises(ValueError, match="unknown backend"):
        layer(torch.randn(2, D), backend="fast")
    for bad in (0, E + 1, -1):
        with pytest.raises(ValueError, match=rf"top_k must be in \[1, {E}\], got {bad}"):
            layer(torch.randn(2, D), top_k=bad)
        with pytest.raises(ValueError, match="top_k"):
            layer.top_k = bad
        with pytest.raises(ValueError, match="top_k"):
            MoE(D, E, H, top_k=bad)
    with pytest.raises(ValueError, match="top_k must be an integer"):
        layer(torch.randn(2, D), top_k=1.5)
    with pytest.raises(ValueError, match=f"last dimension must be d_model={D}"):
        layer(torch.randn(2, D + 1))
    with pytest.raises(ValueError, match="floating-point"):
        layer(torch.ones(2, D, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown option.*'smoe'.*valid"):
        MoE(D, E, H, router="smoe", router_options={"hyper_hidden": 3})
    with pytest.raises(ValueError, match="activation"):
        MoE(D, E, H, activation="tanh")
    assert isinstance(HyperRouterError("x"), ValueError)


@pytest.mark.parametrize("backend", ["grouped", "dense"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_hand_written_backward_passes_gradcheck_with_dropout(backend: str, activation: str) -> None:
    """The expert loop's backward (incl. dropout masks) against finite differences, in float64."""
    torch.manual_seed(6)
    layer = MoE(6, 4, 5, 2, router="smoe", activation=activation, dropout=0.3).double().train()
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(0.0, 0.5)
    params = trainable_parameters(layer)

    def fn(x, *weights):
        torch.manual_seed(123)  # the same dropout masks on every evaluation
        with torch.nn.utils.stateless._reparametrize_module(
            layer, dict(zip([n for n, p in layer.named_parameters() if p.requires_grad], weights))
        ):
            return layer(x, backend=backend)

    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16_runs_every_backend(backend: str) -> None:
    """Under torch.autocast the experts run in the autocast dtype; grads reach fp32 params."""
    layer = make_layer("hyperrouter").train()
    x = torch.randn(24, D, requires_grad=True)
    ref = layer(x, top_k=2, backend="reference").detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, top_k=2, backend=backend)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float().detach(), ref) < 3e-2
    out.float().square().mean().backward()
    assert x.grad is not None and layer.experts.w_in.grad.dtype == torch.float32
    assert layer.router.embedding.grad is not None


def test_grouped_hands_over_to_grouped_mm_where_that_is_fast(monkeypatch) -> None:
    """On CUDA sm90 + bf16 `grouped` runs the torch._grouped_mm path. Force that decision on CPU so
    the hand-over itself (and the path it takes, with biases and capacity dropping) is exercised
    here too; the CUDA test above covers the kernels where a GPU exists."""
    from hyperrouter.moe import experts as experts_module

    assert not experts_module.grouped_mm_fast(
        torch.device("cpu"), torch.bfloat16, make_layer("smoe").experts
    )
    calls = []
    real = experts_module.grouped_mm_backend

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(experts_module, "grouped_mm_fast", lambda *_: True)
    monkeypatch.setattr(experts_module, "grouped_mm_backend", spy)
    for capacity_factor in (None, 0.5):
        layer = make_layer("smoe", capacity_factor=capacity_factor)
        x = torch.randn(40, D, requires_grad=True)
        out = layer(x, top_k=2, backend="grouped", return_details=True)
        out.output.square().sum().backward()
        grads = [x.grad.clone()] + [p.grad.clone() for p in trainable_parameters(layer)]
        x.grad = None
        layer.zero_grad()
        ref = layer(x, top_k=2, backend="reference")
        ref.square().sum().backward()
        ref_grads = [x.grad] + [p.grad for p in trainable_parameters(layer)]
        assert rel_err(out.output, ref) < 1e-5
        assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads))
        assert out.stats.dropped_fraction.device == x.device
        assert (out.stats.dropped_fraction > 0) == (capacity_factor is not None)
    assert len(calls) == 2
