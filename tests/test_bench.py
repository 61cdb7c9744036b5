"""`hyperrouter bench layer`: records have the documented fields and the CLI writes them.

Our layer is labelled `ours` (`ours:<backend>` for forced backends): it is `hyperrouter.MoE` with
the `smoe` router, so that the Mixtral peers can share its gate weights."""

from __future__ import annotations

import json
import re

import pytest

from hyperrouter.bench import run_layer_bench
from hyperrouter.cli import main

FIELDS = {
    "impl",
    "device",
    "dtype",
    "num_experts",
    "top_k",
    "tokens",
    "d_model",
    "d_hidden",
    "mode",
    "median_ms",
    "ratio_vs_dense",
}


def test_bench_records_cover_every_contender() -> None:
    records = run_layer_bench(
        ks=(1, 4),
        num_experts=4,
        d_model=16,
        d_hidden=8,
        tokens=32,
        repeats=2,
        experts=("relu",),
        peers=False,
        progress=False,
    )
    impls = {(r.impl, r.top_k, r.mode) for r in records}
    for k in (1, 4):
        for mode in ("train", "infer"):
            assert ("dense", k, mode) in impls and ("ours", k, mode) in impls
            assert ("ours:grouped", k, mode) in impls
    assert ("ours:dense", 4, "train") in impls  # forced dense only where k >= E/2
    assert ("ours:dense", 1, "train") not in impls
    for r in records:
        assert r.median_ms > 0
        if r.impl == "dense":
            assert r.ratio_vs_dense == 1.0
        elif r.impl.startswith("ours:"):
            assert r.max_rel_diff_vs_ours < 1e-5


def test_bench_cli_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "layer",
            "--quick",
            "--top-k",
            "2",
            "--tokens",
            "64",
            "--repeats",
            "1",
            "--experts",
            "relu",
            "--modes",
            "infer",
            "--no-peers",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    records = json.loads(out.read_text())
    assert {r["impl"] for r in records} == {"dense", "ours"}
    assert all(FIELDS <= set(r) for r in records)
    assert "x dense" in capsys.readouterr().out


def test_bench_cli_rejects_bad_values(capsys) -> None:
    assert main(["bench", "layer", "--modes", "fast"]) == 2
    err = capsys.readouterr().err
    assert "--modes takes train, infer" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--top-k", "17"],
            r"--top-k values must be in \[1, 16\] \(experts per layer\), got \[17\]",
        ),
        (["--top-k", "0"], r"--top-k values must be in \[1, 16\] \(experts per layer\), got \[0\]"),
        (["--top-k", "2,17"], r"got \[17\]"),
        (["--tokens", "0"], "--tokens must be >= 1"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_bench_rejects_k_outside_the_experts(capsys, args, message) -> None:
    assert main(["bench", "layer", "--no-peers", *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, err


def test_bench_times_several_routers(tmp_path, capsys) -> None:
    """--router times each named router's layer against one floor; hash gets synthetic ids."""
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "layer",
            "--quick",
            "--top-k",
            "1,2",
            "--tokens",
            "32",
            "--repeats",
            "1",
            "--experts",
            "relu",
            "--no-peers",
            "--router",
            "sbase,hash",
            "--json",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    records = json.loads(out.read_text())
    ours = {(r["router"], r["top_k"], r["mode"]) for r in records if r["impl"] == "ours"}
    assert ours == {
        (r, k, m) for r in ("sbase", "hash") for k in (1, 2) for m in ("train", "infer")
    }
    assert all(r["router"] is None for r in records if r["impl"] == "dense")
    assert all(r["ratio_vs_dense"] > 0 for r in records)
    assert "hash" in capsys.readouterr().out


def test_bench_rejects_an_unknown_router(capsys) -> None:
    assert main(["bench", "layer", "--router", "smoe,nope"]) == 2
    err = capsys.readouterr().err
    assert "--router: unknown router(s) nope" in err and len(err.strip().splitlines()) == 1
