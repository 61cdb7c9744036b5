"""`hyperrouter bench layer`: records have the documented fields and the CLI writes them."""

from __future__ import annotations

import json

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
            assert ("dense", k, mode) in impls and ("hyperrouter", k, mode) in impls
            assert ("hyperrouter:grouped", k, mode) in impls
    assert ("hyperrouter:dense", 4, "train") in impls  # forced dense only where k >= E/2
    assert ("hyperrouter:dense", 1, "train") not in impls
    for r in records:
        assert r.median_ms > 0
        if r.impl == "dense":
            assert r.ratio_vs_dense == 1.0
        elif r.impl.startswith("hyperrouter:"):
            assert r.max_rel_diff_vs_hyperrouter < 1e-5


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
    assert {r["impl"] for r in records} == {"dense", "hyperrouter"}
    assert all(FIELDS <= set(r) for r in records)
    assert "x dense" in capsys.readouterr().out


def test_bench_cli_rejects_bad_values(capsys) -> None:
    assert main(["bench", "layer", "--modes", "fast"]) == 2
    err = capsys.readouterr().err
    assert "--modes takes train, infer" in err and len(err.strip().splitlines()) == 1
