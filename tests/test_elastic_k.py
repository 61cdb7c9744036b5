"""Elastic-k training schedules: k drawn at random per step (or per layer per step) from a range,
with the stated distribution, reproducible from the seed, and resumed bit-exactly."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from hyperrouter.errors import HyperRouterError
from hyperrouter.moe.schedules import draw_top_k, elastic_support, top_k_at
from hyperrouter.train.config import config_from_dict
from hyperrouter.train.trainer import train_run
from tests.conftest import train_killed_after_checkpoints
from tests.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("isolated_cache")


def test_supports() -> None:
    assert elastic_support("random_uniform", 2, 5) == [2, 3, 4, 5]
    assert elastic_support("random_pow2", 1, 16) == [1, 2, 4, 8, 16]
    assert elastic_support("random_pow2", 3, 7) == [4]
    assert elastic_support("random_pow2", 5, 7) == [5]  # no power of two in range: k_min


@pytest.mark.parametrize("name", ["random_uniform", "random_pow2"])
def test_draws_cover_the_range_uniformly(name: str) -> None:
    """4,000 draws over the support: every value drawn, each within 5 binomial standard
    deviations of its expected count (a fixed seed, so the test is deterministic)."""
    k_min, k_max, n = 1, 16, 4000
    support = elastic_support(name, k_min, k_max)
    counts = Counter(top_k_at(name, step, n, k_min, k_max, seed=1111, layer=0) for step in range(n))
    assert set(counts) == set(support)
    p = 1 / len(support)
    sd = (n * p * (1 - p)) ** 0.5
    for k in support:
        assert abs(counts[k] - n * p) <= 5 * sd, (k, counts[k])


def test_draws_are_a_function_of_seed_step_and_layer() -> None:
    first = [draw_top_k("random_uniform", 7, s, 1, 1, 16) for s in range(50)]
    assert first == [draw_top_k("random_uniform", 7, s, 1, 1, 16) for s in range(50)]
    assert first != [draw_top_k("random_uniform", 8, s, 1, 1, 16) for s in range(50)]
    assert first != [draw_top_k("random_uniform", 7, s, 2, 1, 16) for s in range(50)]


def test_config_draws_one_k_or_one_per_layer() -> None:
    base = {"top_k_schedule": "random_uniform", "top_k_min": 1, "top_k_max": 4, "steps": 10}
    shared = config_from_dict({"train": base})
    assert all(isinstance(shared.train_top_ks(s, 3), int) for s in range(10))
    per_layer = config_from_dict({"train": {**base, "top_k_per_layer": True}})
    draws = [per_layer.train_top_ks(s, 3) for s in range(10)]
    assert all(len(d) == 3 and all(1 <= k <= 4 for k in d) for d in draws)
    assert any(len(set(d)) > 1 for d in draws)  # layers draw independently
    assert per_layer.final_top_k() == 4


@pytest.mark.parametrize(
    "train,message",
    [
        ({"top_k_schedule": "random_uniform", "top_k_min": 0}, "1 <= train.top_k_min"),
        ({"top_k_schedule": "random_pow2", "top_k_max": 17}, "<= moe.num_experts=16"),
        ({"top_k_schedule": "random_normal"}, "unknown train.top_k_schedule"),
    ],
)
def test_an_elastic_range_outside_1_e_is_a_one_line_error(train: dict, message: str) -> None:
    with pytest.raises(HyperRouterError, match=message) as info:
        config_from_dict({"train": train}).validate()
    assert "\n" not in str(info.value)


def test_per_layer_training_logs_each_layers_k_and_resumes_bit_exactly(
    tmp_path: Path, corpus: Path, monkeypatch
) -> None:
    train = {
        "steps": 12,
        "eval_interval": 4,
        "log_interval": 1,
        "top_k_schedule": "random_uniform",
        "top_k_min": 1,
        "top_k_max": 4,
        "top_k_per_layer": True,
    }
    cfg = config_from_dict(tiny_config(corpus, train=train))
    straight = train_run(cfg, tmp_path / "a", progress=False, log=lambda _: None)
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["top_k"] for r in records if r["split"] == "train"]
    layers = len(cfg.moe.layers)
    assert logged == [cfg.train_top_ks(step, layers) for step in range(12)]
    train_killed_after_checkpoints(cfg, tmp_path / "b", monkeypatch)
    resumed = train_run(None, tmp_path / "b", resume=True, progress=False, log=lambda _: None)
    assert resumed["by_top_k"] == straight["by_top_k"]
    from safetensors.torch import load_file

    def final(run: Path) -> dict[str, torch.Tensor]:
        index = json.loads((run / "checkpoints" / "index.json").read_text())
        return load_file(str(run / "checkpoints" / index["latest"] / "model.safetensors"))

    a, b = final(tmp_path / "a"), final(tmp_path / "b")
    assert all(torch.equal(a[key], b[key]) for key in a)
