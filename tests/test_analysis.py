"""Routing statistics on constructed cases; `analyze` and `compare` end to end on tiny runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from hyperrouter.analysis import compare as compare_mod
from hyperrouter.analysis.analyze import analyze_run
from hyperrouter.analysis.routing import (
    coefficient_of_variation,
    entropy_per_token,
    expert_load,
    expert_similarity,
    routing_agreement,
)
from hyperrouter.cli import main
from hyperrouter.routers import Routing
from hyperrouter.train.config import config_from_dict, load_config
from hyperrouter.train.trainer import train_run
from tests.test_train import tiny_config

E = 8


def test_one_hot_router_has_zero_entropy_and_maximal_imbalance() -> None:
    logits = torch.full((100, E), -1e4)
    logits[:, 3] = 0.0
    assert entropy_per_token(logits).abs().max() < 1e-6
    counts = expert_load(logits.topk(1).indices, E)
    assert counts.tolist() == [0, 0, 0, 100, 0, 0, 0, 0]
    assert coefficient_of_variation(counts) == pytest.approx(math.sqrt(E - 1))


def test_uniform_router_has_maximal_entropy_and_balanced_load() -> None:
    assert entropy_per_token(torch.zeros(5, E)).tolist() == pytest.approx([math.log(E)] * 5)
    balanced = expert_load(torch.arange(E * 3).remainder(E)[:, None], E)
    assert coefficient_of_variation(balanced) == 0.0


def test_expert_similarity_known_cases() -> None:
    same = torch.randn(1, 50, 16).expand(4, 50, 16)
    assert expert_similarity(same) == pytest.approx(1.0)
    opposite = torch.stack([same[0], -same[0]])
    assert expert_similarity(opposite) == pytest.approx(-1.0)
    basis = torch.eye(4)[:, None, :].expand(4, 10, 4)  # orthogonal experts
    assert expert_similarity(basis) == pytest.approx(0.0)


def test_routing_agreement() -> None:
    ids = torch.tensor([[0, 1], [2, 3], [1, 0]])
    weights = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    same = Routing(ids, weights)
    assert routing_agreement(same, same, E) == {"top1_changed": 0.0, "topk_jaccard": 1.0}
    # first choices are the highest-weight slots: 0, 3, 1 vs 1, 2, 0 -> all changed; same sets
    swapped = Routing(ids, 1 - weights)
    assert routing_agreement(same, swapped, E) == {"top1_changed": 1.0, "topk_jaccard": 1.0}
    # dropped slots do not count as used: token 0 keeps only expert 1 -> Jaccard 1/2 there
    dropped = Routing(ids, weights, keep=torch.tensor([[False, True], [True, True], [True, True]]))
    got = routing_agreement(same, dropped, E)
    assert got["topk_jaccard"] == pytest.approx((0.5 + 1 + 1) / 3)


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("HYPERROUTER_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "text.txt"
    path.write_bytes(b"pack my box with five dozen liquor jugs. " * 200)
    return path


def test_analyze_a_trained_run(tmp_path, corpus, capsys) -> None:
    run = tmp_path / "run"
    train_run(config_from_dict(tiny_config(corpus)), run, progress=False, log=lambda _: None)
    result = analyze_run(run, max_tokens=200, diversity_tokens=32)
    assert len(result["layers"]) == 2 and result["top_k"] == 4
    for layer in result["layers"]:
        assert 0 <= layer["entropy_mean"] <= math.log(4) + 1e-6
        assert sum(layer["tokens_per_expert"]) == layer["tokens"] * 4 == 200 * 4
        assert sum(layer["tokens_per_expert_top1"]) == 200
        assert layer["load_cv_top1"] == pytest.approx(
            coefficient_of_variation(torch.tensor(layer["tokens_per_expert_top1"]))
        )
        assert -1 <= layer["expert_similarity"] <= 1
        assert sum(layer["entropy_histogram"]["counts"]) == 200
    on_disk = json.loads((run / "analysis" / "analysis.json").read_text())
    assert on_disk["means"] == result["means"]
    assert (run / "analysis" / "routing.png").is_file()
    assert main(["analyze", str(run), "--tokens", "64", "--out", str(tmp_path / "a2")]) == 0
    assert "entropy" in capsys.readouterr().out


def _tiny_yaml(tmp_path: Path, corpus: Path) -> Path:
    import yaml

    cfg = tiny_config(corpus, train={"steps": 4, "eval_interval": 2, "log_interval": 2})
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_compare_end_to_end_and_resume(tmp_path, corpus, monkeypatch) -> None:
    base = _tiny_yaml(tmp_path, corpus)
    out = tmp_path / "sweep"
    args = [
        "compare",
        "--methods",
        "hyperrouter,dense_ffn",
        "--seeds",
        "2",
        "--config",
        str(base),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "bpc" and summary["ks"] == [1, 2, 4]
    assert set(summary["methods"]) == {"hyperrouter", "dense_ffn"}
    hyper = summary["methods"]["hyperrouter"]
    assert len(hyper["by_top_k"]["1"]["values"]) == 2
    assert (
        summary["methods"]["dense_ffn"]["dense"]
        and summary["methods"]["dense_ffn"]["analysis"] is None
    )
    assert hyper["analysis"]["entropy_mean"]["mean"] > 0
    assert (
        hyper["parameters"]["frozen"] > 0
        and summary["methods"]["dense_ffn"]["parameters"]["frozen"] == 0
    )
    # the table, the CSV and the JSON agree
    rows = {r["method"]: r for r in csv.DictReader((out / "table.csv").open())}
    table = (out / "table.md").read_text()
    for method, m in summary["methods"].items():
        for k in ("1", "2", "4"):
            stats = m["by_top_k"][k]
            assert float(rows[method][f"k{k}_mean"]) == pytest.approx(stats["mean"])
            assert f"{stats['mean']:.4f} ± {stats['std']:.4f}" in table
            assert stats["mean"] == pytest.approx(sum(stats["values"]) / 2)
        for seed, value in zip(m["seeds"], m["by_top_k"]["4"]["values"]):
            res = json.loads((out / "runs" / f"{method}-seed{seed}" / "results.json").read_text())
            assert res["by_top_k"]["1" if m["dense"] else "4"] == value
    for k, best in summary["best"].items():
        assert f"**{summary['methods'][best]['by_top_k'][k]['mean']:.4f}" in table
        assert k in rows[best]["best_at"].split()
    for png in ("quality_vs_k.png", "quality_vs_speed.png", "valid_curves.png"):
        assert (out / png).stat().st_size > 1000
    assert (out / "quality_vs_cost.png").stat().st_size > 1000
    # AIQ: each run's from its own k values, in results.json, summary.json, the table and CSV
    from hyperrouter.analysis.aiq import aiq

    for method, m in summary["methods"].items():
        for seed, value in zip(m["seeds"], m["aiq"]["by_macs"]["values"]):
            res = json.loads((out / "runs" / f"{method}-seed{seed}" / "results.json").read_text())
            macs = res["cost"]["macs_per_token"]
            want = aiq([(macs[k], -res["by_top_k"][k]) for k in res["by_top_k"]])
            assert res["aiq"]["by_macs"] == pytest.approx(want) and value == pytest.approx(want)
        assert float(rows[method]["aiq_by_macs"]) == pytest.approx(m["aiq"]["by_macs"]["mean"])
        assert f"{m['aiq']['by_macs']['mean']:.4f}" in table

    # half-finished sweep: one run lost its results; only that one trains again (and resumes)
    lost = out / "runs" / "dense_ffn-seed1112" / "results.json"
    lost.unlink()
    # and an analysis written by an older version (a statistic missing) is redone, not reused
    stale_path = out / "runs" / "hyperrouter-seed1111" / "analysis" / "analysis.json"
    stale = json.loads(stale_path.read_text())
    del stale["means"]["load_cv_top1"]
    stale_path.write_text(json.dumps(stale))
    calls = []
    real = compare_mod.train_run

    def counting(config, run_dir, **kwargs):
        calls.append((Path(run_dir).name, kwargs["resume"]))
        return real(config, run_dir, **kwargs)

    monkeypatch.setattr(compare_mod, "train_run", counting)
    assert main(args) == 0
    assert calls == [("dense_ffn-seed1112", True)]
    assert lost.is_file()
    assert "load_cv_top1" in json.loads(stale_path.read_text())["means"]


def test_methods_match_the_cpu_presets() -> None:
    base = load_config("enwik8-hyperrouter-cpu")
    presets = {"dense_ffn": "dense", "dense_ffn_dropout": "dense_dropout"}
    for method in ("smoe_dropout", "smoe", "dense_ffn", "dense_ffn_dropout"):
        made = load_config("enwik8-hyperrouter-cpu", compare_mod.method_overrides(method, base))
        preset = load_config(f"enwik8-{presets.get(method, method)}-cpu")
        assert made.to_dict() | {"name": "", "description": ""} == preset.to_dict() | {
            "name": "",
            "description": "",
        }, method


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "hyperrouter,magic"], "unknown method(s) magic"),
        (["--methods", "dense"], "'dense' is ambiguous: use dense_ffn"),
        (["--methods", ","], "--methods needs at least one"),
        (["--seeds", "0"], "--seeds must be >= 1"),
    ],
)
def test_compare_bad_input(tmp_path, corpus, capsys, args, message) -> None:
    out = tmp_path / "sweep"
    base = _tiny_yaml(tmp_path, corpus)
    code = main(["compare", "--config", str(base), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_compare_refuses_a_sweep_of_another_configuration(tmp_path, corpus, capsys) -> None:
    base = _tiny_yaml(tmp_path, corpus)
    out = tmp_path / "sweep"
    args = [
        "compare",
        "--methods",
        "dense_ffn",
        "--seeds",
        "1",
        "--config",
        str(base),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--set", "train.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "holds a sweep with a different configuration: train.lr: " in err
    assert "(sweep) vs 0.1 (given)" in err


def test_compare_runs_every_registered_router(tmp_path, corpus) -> None:
    """A tiny sweep over every router of the registry (and the dense-FFN baseline): each trains,
    is evaluated at every k and analysed, and lands in the table."""
    import yaml

    from hyperrouter.routers import ROUTERS

    cfg = tiny_config(
        corpus,
        train={"steps": 2, "eval_interval": 2, "log_interval": 1, "batch_size": 2, "tgt_len": 8},
        eval={"tgt_len": 8, "batch_size": 2, "top_ks": [1, 4], "max_valid_batches": 2},
    )
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(cfg))
    methods = [("all_experts" if r == "dense" else r) for r in sorted(ROUTERS)] + ["dense_ffn"]
    out = tmp_path / "zoo"
    args = ["compare", "--methods", ",".join(methods), "--seeds", "1", "--config", str(base)]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == set(methods)
    table = (out / "table.md").read_text()
    for method, m in summary["methods"].items():
        assert method in table
        for k in ("1", "4"):
            assert math.isfinite(m["by_top_k"][k]["mean"]), method
        if method != "dense_ffn":
            dropped = m["analysis"]["dropped_fraction"]["mean"]
            assert 0.0 <= dropped <= 1.0, method


def test_analyze_reports_the_dropped_fraction_the_run_really_had(tmp_path, corpus) -> None:
    cfg = tiny_config(corpus, moe={"router": "smoe", "router_options": {}, "capacity_factor": 0.5})
    cfg["train"].update({"top_k_schedule": "constant", "top_k_min": 2, "top_k_max": 2})
    run = tmp_path / "run"
    train_run(config_from_dict(cfg), run, progress=False, log=lambda _: None)
    result = analyze_run(run, max_tokens=64, diversity_tokens=16, make_plots=False)
    for layer in result["layers"]:
        # capacity ceil(T * 2 / 4 * 0.5) = T / 4 per expert: at most half of the 2T pairs fit
        assert layer["dropped_fraction"] >= 0.5 - 1e-9
        kept = sum(layer["tokens_per_expert"])
        assert layer["dropped_fraction"] == pytest.approx(1 - kept / (layer["tokens"] * 2))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert all(r["dropped_fraction"] >= 0.5 - 1e-9 for r in train)
    assert all(len(r["expert_load"]) == 2 and len(r["expert_load"][0]) == 4 for r in train)


def test_off_node_fraction_on_a_constructed_case() -> None:
    from hyperrouter.analysis.routing import off_node_fraction

    # 4 experts on 2 nodes: experts 0, 1 on node 0; 2, 3 on node 1. Sequences 0 and 1.
    ids = torch.tensor([[0, 2], [3, 1], [2, 3]])
    seq = torch.tensor([0, 1, 1])
    # token 0 (node 0): expert 2 off; token 1 (node 1): expert 1 off; token 2: both local
    assert off_node_fraction(Routing(ids, torch.ones(3, 2)), seq, 4, 2) == pytest.approx(2 / 6)
    keep = torch.tensor([[True, False], [True, True], [True, True]])
    got = off_node_fraction(Routing(ids, torch.ones(3, 2), keep=keep), seq, 4, 2)
    assert got == pytest.approx(1 / 5)  # dropped pairs move nothing


def test_dense_expert_method_is_the_scaling_law_dense_baseline() -> None:
    base = load_config("quick")
    made = load_config("quick", compare_mod.method_overrides("dense_expert", base))
    assert made.moe.layers == [] and made.model.d_inner == base.moe.d_expert
    cells = compare_mod.grid_cells(base, ["dense_expert", "hash"], [4, 8], [64, 128])
    assert [c for c in cells if c.startswith("dense_expert")] == [
        "dense_expert-d64",
        "dense_expert-d128",
    ]  # independent of E: once per size


def test_analyze_at_another_k(tmp_path, corpus, capsys) -> None:
    run = tmp_path / "run"
    train_run(config_from_dict(tiny_config(corpus)), run, progress=False, log=lambda _: None)
    result = analyze_run(run, max_tokens=64, diversity_tokens=8, make_plots=False, top_k=1)
    assert result["top_k"] == 1
    assert all(sum(layer["tokens_per_expert"]) == layer["tokens"] for layer in result["layers"])
    code = main(["analyze", str(run), "--top-k", "9", "--out", str(tmp_path / "a")])
    assert code == 2 and "--top-k must be in [1, 4], got 9" in capsys.readouterr().err
