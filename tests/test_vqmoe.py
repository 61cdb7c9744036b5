"""VQMoE: nearest-code routing, the VQ loss, EMA codebook and dead-code restarts, and the paper's
two-path layer (a routed path and the discrete path mixed by a learned 2-way softmax)."""

from __future__ import annotations

import pytest
import torch

from hyperrouter import HyperRouterError, MoE
from hyperrouter.params import trainable_parameters
from hyperrouter.routers import RoutingContext, build_router
from hyperrouter.train.step import ChunkResult, training_step

E, D, H = 4, 6, 10


def test_tokens_go_to_the_expert_of_their_nearest_code() -> None:
    torch.manual_seed(0)
    router = build_router("vqmoe", D, E, codebook_size=8)
    with torch.no_grad():
        router.codebook.copy_(torch.eye(8, D) * 10 if D >= 8 else torch.randn(8, D) * 10)
    x = router.codebook.detach()[[5, 2, 7]] + 0.01 * torch.randn(3, D)
    routing = router(x, RoutingContext(top_k=1, training=False))
    assert routing.expert_ids.flatten().tolist() == [5 % E, 2 % E, 7 % E]
    assert torch.equal(routing.weights, torch.ones(3, 1)) and routing.logits is None


def test_vq_loss_is_codebook_plus_weighted_commitment() -> None:
    torch.manual_seed(0)
    router = build_router("vqmoe", D, E, vq_loss_weight=0.5, commitment=0.25)
    x = torch.randn(7, D, requires_grad=True)
    routing = router(x, RoutingContext(top_k=1, training=True))
    q = router.codebook[routing.expert_ids[:, 0]]
    expected = 0.5 * ((x.detach() - q).square().mean() + 0.25 * (x - q.detach()).square().mean())
    torch.testing.assert_close(routing.aux_losses["vq_loss"], expected)
    routing.aux_losses["vq_loss"].backward()
    assert router.codebook.grad is not None and x.grad is not None


def test_ema_codebook_moves_toward_its_tokens_once_per_optimizer_step_and_restarts_dead_codes():
    torch.manual_seed(0)
    layer = MoE(
        D,
        E,
        H,
        1,
        router="vqmoe",
        router_options={"ema_decay": 0.5, "dead_code_threshold": 0.9},
    ).train()
    router = layer.router
    assert not router.codebook.requires_grad
    target = torch.full((D,), 3.0)
    x = target + 0.01 * torch.randn(16, D)
    before = router.codebook.detach().clone()
    opt = torch.optim.SGD(trainable_parameters(layer), lr=0.0)

    def chunk():
        out = layer(x, return_details=True)
        return ChunkResult(out.output.sum() * 0, torch.zeros(()), None, [out])

    used = int(router.nearest_codes(x, 1)[0, 0])  # every token's nearest code
    assert (router.nearest_codes(x, 1) == used).all()
    training_step(layer, opt, [chunk], step=0, clip=0.0, params=trainable_parameters(layer))
    after = router.codebook.detach()
    # the code that got all 16 tokens: EMA count 0.5 * 1 + 0.5 * 16, EMA sum 0.5 e + 0.5 sum(x)
    expected = (0.5 * before[used] + 0.5 * x.sum(0)) / 8.5
    torch.testing.assert_close(after[used], expected, rtol=1e-4, atol=1e-4)
    # the others got no token: their EMA count decayed to 0.5 < 0.9 -> restarted at a token
    for j in range(E):
        if j != used:
            assert (after[j] == x).all(-1).any(), j
    layer.eval()
    frozen = router.codebook.detach().clone()
    layer(x)
    layer.optimizer_step(1)
    assert torch.equal(router.codebook.detach(), frozen)  # nothing accumulated in eval


def test_the_two_path_layer_mixes_routed_and_discrete_outputs_by_a_learned_gate() -> None:
    torch.manual_seed(0)
    layer = MoE(D, E, H, 2, router="smoe", second_router="vqmoe").eval()
    routed = MoE(D, E, H, 2, router="smoe").eval()
    routed.load_state_dict(layer.state_dict(), strict=False)
    discrete = MoE(D, E, H, 1, router="vqmoe").eval()
    discrete.load_state_dict(
        {k.replace("second_router.", "router."): v for k, v in layer.state_dict().items()},
        strict=False,
    )
    x = torch.randn(9, D)
    gate = torch.softmax(layer.path_gate(x), dim=-1)
    expected = gate[:, :1] * routed(x) + gate[:, 1:] * discrete(x)
    out = layer(x, return_details=True)
    torch.testing.assert_close(out.output, expected)
    assert "vq_loss" in out.aux_losses  # the discrete path's loss joins the layer's
    assert out.stats.top_k == 2  # statistics are the routed path's


def test_bad_options_are_one_line_errors() -> None:
    with pytest.raises(HyperRouterError, match="codebook_size must be an integer >= num_experts"):
        build_router("vqmoe", D, E, codebook_size=2)
    with pytest.raises(HyperRouterError, match=r"ema_decay must be a number in \(0, 1\)"):
        build_router("vqmoe", D, E, ema_decay=1.0)
