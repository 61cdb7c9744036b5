"""z-loss and balance loss for every router with logits (issue 12): each such router accepts a
router z-loss, and a balance loss where one can move the load; the layer's aux_losses carry them."""

from __future__ import annotations

import pytest
import torch

from hyperrouter import HyperRouterError, MoE
from hyperrouter.routers import ROUTERS, router_option_defaults
from hyperrouter.routers.losses import router_z_loss, switch_balance_loss

E, D, H, T = 8, 16, 24, 40
W = 0.5
# Routers with logits but no balance-loss option, and why: balanced by construction in training
# (expert choice, BASE; S-BASE up to its Sinkhorn tolerance) or every token on every expert
# (dense: the Switch loss is the constant 1).
# remoe: its load-balanced L1 (tested in test_routers_top_p_remoe.py) is its balance term.
NO_BALANCE = {"base", "dense", "expert_choice", "remoe", "sbase", "smear"}  # smear: all experts
# The Switch loss over the first slot only (GShard's f_i counts first choices).
FIRST_SLOT_BALANCE = {"gshard", "cosine", "perturbed_cosine", "sigmoid"}
# Routers that score more choices than experts (null experts, ternary choices): their z-loss is
# over every choice's logit.
Z_OVER_CHOICES = {"adamoe", "tc_moe"}
# A balance loss of the router's own (StableMoE's L_bal), tested in test_routers_v2_more.py.
# top_p: f over the kept experts; adamoe: null experts as one group; tc_moe: over computed choices
OWN_BALANCE = {"adamoe", "stablemoe", "tc_moe", "top_p"}


def z_options(name: str, weight: float) -> dict:
    """Router options turning the z-loss on (the dense router takes it through its base router)."""
    if name == "dense":
        return {"base_options": {"z_loss_weight": weight}}
    return {"z_loss_weight": weight}


def run(name: str, training: bool, **options):
    torch.manual_seed(0)
    layer = MoE(D, E, H, 2, router=name, router_options=options).train(training)
    x = torch.randn(T, D, requires_grad=True)  # a frozen router's losses still reach its input
    return layer, x, layer(x, return_details=True, token_ids=torch.arange(T) % 50)


def logit_routers() -> list[str]:
    """Registered routers whose Routing carries logits [T, E] (with default options)."""
    return sorted(n for n in ROUTERS if run(n, training=False)[2].routing.logits is not None)


LOGIT_ROUTERS = logit_routers()


@pytest.mark.parametrize("name", LOGIT_ROUTERS)
def test_every_router_with_logits_offers_the_z_loss_and_a_balance_loss_where_it_can_act(
    name: str,
) -> None:
    options = router_option_defaults(name)
    assert "z_loss_weight" in options or name == "dense", f"{name} has no z_loss_weight"
    has_balance = "balance_loss_weight" in options
    assert has_balance != (name in NO_BALANCE), (
        f"router {name!r}: add balance_loss_weight, or list it in NO_BALANCE with the reason "
        "in its docstring and docs/ROUTERS.md"
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", LOGIT_ROUTERS)
def test_z_loss_is_in_the_layer_aux_losses_with_its_value(name: str, training: bool) -> None:
    assert "z_loss" not in run(name, training)[2].aux_losses  # off by default
    layer, x, out = run(name, training, **z_options(name, W))
    expected = W * router_z_loss(out.routing.logits)  # stablemoe stage 1: the backbone scores
    if name in Z_OVER_CHOICES:  # every choice's logit, not the [T, E] summary the router reports
        router = layer.router
        choices = router.choice_logits(x) if name == "tc_moe" else router.gate(x)
        expected = W * router_z_loss(choices)
    torch.testing.assert_close(out.aux_losses["z_loss"], expected)
    assert out.aux_losses["z_loss"].requires_grad


@pytest.mark.parametrize("name", sorted(set(LOGIT_ROUTERS) - NO_BALANCE - OWN_BALANCE))
def test_balance_loss_is_in_the_layer_aux_losses_with_its_value(name: str) -> None:
    _, _, out = run(name, True, balance_loss_weight=W)
    ids = out.routing.expert_ids
    if name in FIRST_SLOT_BALANCE:
        ids = ids[:, :1]
    expected = W * switch_balance_loss(out.routing.logits, ids)
    torch.testing.assert_close(out.aux_losses["balance_loss"], expected)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_base_z_loss_is_on_the_affinities_and_trains_the_expert_embeddings(training: bool) -> None:
    layer, x, out = run("base", training, z_loss_weight=W)
    scores = x @ layer.router.centroids.t()
    torch.testing.assert_close(out.aux_losses["z_loss"], W * router_z_loss(scores))
    assert set(out.aux_losses) == {"z_loss"}
    out.aux_losses["z_loss"].backward()
    assert layer.router.centroids.grad.abs().sum() > 0


def test_stablemoe_z_loss_is_on_the_backbone_scores_in_both_stages() -> None:
    torch.manual_seed(0)
    options = {"switch_step": 5, "z_loss_weight": W}
    layer = MoE(D, E, H, 1, router="stablemoe", router_options=options)
    x = torch.randn(T, D)
    router = layer.router
    for step, stage_losses in ((0, {"balance_loss", "distill_loss", "z_loss"}), (5, {"z_loss"})):
        layer.train()
        layer.step = step
        layer.zero_grad(set_to_none=True)
        out = layer(x, return_details=True)
        assert set(out.aux_losses) == stage_losses
        scores = x @ router.centroids.t()
        torch.testing.assert_close(out.aux_losses["z_loss"], W * router_z_loss(scores))
        out.aux_losses["z_loss"].backward()
        assert router.centroids.grad.abs().sum() > 0
    # stage 2: the routing logits are the frozen distilled router's, the z-loss is not on them
    assert not torch.allclose(out.routing.logits, scores)
    assert router.distill_centroids.grad is None


@pytest.mark.parametrize("name", ["base", "stablemoe", "expert_choice", "xmoe"])
def test_a_negative_z_loss_weight_is_a_one_line_error(name: str) -> None:
    with pytest.raises(HyperRouterError, match="z_loss_weight") as err:
        MoE(D, E, H, 1, router=name, router_options={"z_loss_weight": -1.0})
    assert "\n" not in str(err.value)
