"""Bugs where state crosses a module boundary: a stage that must only move forward, a second
router nobody fitted, combine weights after dropped duplicates, a second path that ignored the
layer's capacity and backend, and config values that broke runs instead of stopping them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hyperrouter import MoE
from hyperrouter.cli import main
from hyperrouter.moe.dispatch import LocalDispatcher
from hyperrouter.routers import RoutingContext, build_router
from hyperrouter.train.config import config_from_dict
from hyperrouter.train.trainer import train_run
from tests.conftest import train_killed_after_checkpoints
from tests.test_train import tiny_config

D, E, H = 8, 4, 12


pytestmark = pytest.mark.usefixtures("isolated_cache")  # corpus: tests/conftest.py


# --------------------------------------------------------------------------- StableMoE


def test_stablemoe_stage_two_is_permanent() -> None:
    """Fine-tuning restarts the step counter at 0: a stage-2 router must stay in stage 2 (frozen
    routing, no balance or distillation loss), in its buffer and through a state_dict."""
    torch.manual_seed(0)
    router = build_router("stablemoe", D, E, switch_step=3, vocab_size=10).train()
    x, ids = torch.randn(6, D), torch.arange(6)

    def losses(step: int) -> set[str]:
        ctx = RoutingContext(top_k=1, training=True, step=step, token_ids=ids)
        return set(router(x, ctx).aux_losses)

    assert {"balance_loss", "distill_loss"} <= losses(0)  # stage 1
    router.optimizer_step(torch.zeros(E), step=2)  # the step before switch_step: now stage 2
    assert int(router.stage) == 2
    for step in (0, 1, 5):  # a fine-tuning run's counter starts again at 0
        assert not {"balance_loss", "distill_loss"} & losses(step)
        router.optimizer_step(torch.zeros(E), step=step)
        assert int(router.stage) == 2
    fresh = build_router("stablemoe", D, E, switch_step=3, vocab_size=10)
    fresh.load_state_dict(router.state_dict())
    ctx = RoutingContext(top_k=1, training=True, step=0, token_ids=ids)
    assert fresh.stage_for(ctx) == 2


# --------------------------------------------------------------------------- second router


def test_a_balanced_hash_table_as_second_router_is_fitted_before_training(corpus) -> None:
    moe = {"second_router": "hash", "second_router_options": {"table": "balanced"}}
    cfg = tiny_config(corpus, moe=moe, train={"steps": 2, "eval_interval": 2})
    results = train_run(config_from_dict(cfg), corpus.parent / "run", progress=False, log=print)
    assert results["by_top_k"]


def test_second_path_obeys_the_layers_capacity_and_backend(monkeypatch) -> None:
    torch.manual_seed(0)
    layer = MoE(D, E, H, 2, router="smoe", second_router="smoe", second_top_k=2)
    layer.capacity_factor = 0.5
    seen: list[str] = []
    original = LocalDispatcher.tokens

    def spy(self, experts, routed):
        seen.append(routed.backend)
        return original(self, experts, routed)

    monkeypatch.setattr(LocalDispatcher, "tokens", spy)
    layer(torch.randn(16, D), backend="reference")
    assert seen == ["reference", "reference"]  # the second path too
    second = layer.second_router(torch.randn(16, D), RoutingContext(top_k=2, training=False))
    routed = layer._plan(torch.randn(16, D), second, 2, "auto", torch.float32, False)
    capacity = -(-16 * 2 * 0.5 // E)  # ceil(T k / E c)
    kept = torch.bincount(routed.routing.expert_ids[routed.keep_TK], minlength=E)
    assert routed.keep_TK is not None and int(kept.max()) <= capacity


# --------------------------------------------------------------------------- VQMoE


def test_vqmoe_weights_stay_normalised_when_codes_share_an_expert() -> None:
    """Codebook of 8 codes for 4 experts at k = 2: codes c and c + 4 map to one expert; the
    duplicate is dropped and the kept expert carries the whole weight."""
    router = build_router("vqmoe", D, E, codebook_size=8).eval()
    with torch.no_grad():
        router.codebook.zero_()
        router.codebook[1, 0] = 1.0
        router.codebook[5, 0] = 0.9  # the second nearest code of x = e_0, also expert 1
        router.codebook[2, 1] = 1.0
    x = torch.zeros(2, D)
    x[0, 0] = 1.0  # nearest codes 1 and 5: both expert 1
    x[1, 1] = 1.0  # nearest codes 2 and then one of the zero codes: two experts
    routing = router(x, RoutingContext(top_k=2, training=False))
    assert routing.keep[0].tolist() == [True, False]
    assert routing.weights[0].tolist() == [1.0, 0.0]
    kept = routing.weights * (routing.keep if routing.keep is not None else 1)
    torch.testing.assert_close(kept.sum(-1), torch.ones(2))


# --------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("eval.max_valid_batches=0", "eval.max_valid_batches must be >= 1 or null"),
        ("train.clip=-1", "train.clip must be >= 0"),
        ("train.lr_min=1", "train.lr_min must be in [0, train.lr="),
        ("train.warmup_steps=-5", "train.warmup_steps must be >= 0"),
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0"),
    ],
)
def test_config_values_that_broke_runs_are_one_line_errors(
    setting: str, needle: str, tmp_path, capsys
) -> None:
    out = tmp_path / "o"
    assert main(["train", "--config", "quick", "--set", setting, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("setting", ["clip=-1", "weight_decay=-1", "lr=0"])
def test_finetune_config_values_are_checked(setting: str, tmp_path, capsys) -> None:
    args = ["finetune", "--task", "sst2", "--data", str(tmp_path), "--set", setting]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert setting.split("=")[0] in capsys.readouterr().err


def test_results_of_a_run_with_a_second_router_are_written(corpus, tmp_path) -> None:
    moe = {"second_router": "vqmoe", "capacity_factor": 1.0}
    cfg = tiny_config(corpus, moe=moe, train={"steps": 2, "eval_interval": 2})
    train_run(config_from_dict(cfg), tmp_path / "vq", progress=False, log=lambda _: None)
    assert json.loads((tmp_path / "vq" / "results.json").read_text())["by_top_k"]


# --------------------------------------------------------------------------- resume


STATEFUL = {
    "aux_free": {"router": "aux_free", "router_options": {"bias_update_rate": 0.01}},
    "vqmoe_ema": {"router": "vqmoe", "router_options": {"ema_decay": 0.9}},
    "stablemoe": {"router": "stablemoe", "router_options": {"switch_step": 6}},
    "rlr": {"router": "rlr", "router_options": {}},
    "hash_balanced": {"router": "hash", "router_options": {"table": "balanced"}},
    "remoe": {"router": "remoe", "router_options": {"lambda_0": 1e-3}},
}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_killed_and_resumed_run_of_a_stateful_router_is_bit_exact(
    name: str, tmp_path, corpus, monkeypatch
) -> None:
    """Killed right after the step-8 checkpoint and resumed: the same metrics, results and final
    weights and buffers (the aux-free bias, the EMA codebook, the StableMoE stage, RL-R's
    baseline, the balanced hash table, ReMoE's L1 coefficient) as the run that was never
    stopped."""
    from safetensors.torch import load_file

    train = {"steps": 12, "eval_interval": 4, "top_k_min": 2, "top_k_max": 2}
    cfg = config_from_dict(tiny_config(corpus, moe=STATEFUL[name], train=train))
    straight = train_run(cfg, tmp_path / "a", progress=False, log=lambda _: None)
    train_killed_after_checkpoints(cfg, tmp_path / "b", monkeypatch)
    resumed = train_run(None, tmp_path / "b", resume=True, progress=False, log=lambda _: None)
    assert resumed["by_top_k"] == straight["by_top_k"]

    def final(run: Path) -> dict[str, torch.Tensor]:
        index = json.loads((run / "checkpoints" / "index.json").read_text())
        return load_file(str(run / "checkpoints" / index["latest"] / "model.safetensors"))

    a, b = final(tmp_path / "a"), final(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a), name
    state = {
        "aux_free": "expert_bias",
        "vqmoe_ema": "codebook",
        "stablemoe": "stage",
        "rlr": "baseline",
        "hash_balanced": "table",
        "remoe": "l1_coeff",
    }[name]
    assert any(state in key for key in a), sorted(a)
