"""The variable-k family from the command line: a bad option is one line naming the option and
its range (exit 2, no run folder left), and the MoE++ and elastic-k settings train end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hyperrouter.cli import main
from tests.conftest import TINY_RUN

pytestmark = pytest.mark.usefixtures("isolated_cache")


def train(tmp_path: Path, corpus: Path, *settings: str) -> tuple[list[str], Path]:
    out = tmp_path / "run"
    args = ["train", "--config", "quick", "--data", str(corpus), "--out", str(out)]
    for setting in [*TINY_RUN, "train.steps=2", "train.eval_interval=2", *settings]:
        args += ["--set", setting]
    return [*args, "--no-progress"], out


@pytest.mark.parametrize(
    "settings,needle",
    [
        (["moe.router=top_p", "moe.router_options={p: 1.5}"], "p must be a number in (0, 1]"),
        (["moe.router=top_p", "moe.router_options={p: 0}"], "p must be a number in (0, 1]"),
        (
            ["moe.router=remoe", "moe.router_options={target_sparsity: 1.0}"],
            "target_sparsity must be a number in (0, 1)",
        ),
        (["moe.router=adamoe", "moe.router_options={null_experts: -1}"], "null_experts must be"),
        (["train.top_k_schedule=random_uniform", "train.top_k_min=0"], "1 <= train.top_k_min"),
        (["train.top_k_schedule=random_pow2", "train.top_k_max=5"], "<= moe.num_experts=4"),
        (["moe.zero_experts=-1"], "zero_experts must be an integer >= 0"),
        (["moe.router=hash", "moe.gating_residual=true"], "gating_residual needs a logit router"),
    ],
)
def test_a_bad_option_is_one_line_naming_it_and_its_range(
    settings: list[str], needle: str, tmp_path: Path, corpus: Path, capsys
) -> None:
    args, out = train(tmp_path, corpus, *settings)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_moepp_and_elastic_k_train_end_to_end_and_report_ffn_experts(
    tmp_path: Path, corpus: Path, capsys
) -> None:
    args, out = train(
        tmp_path,
        corpus,
        "moe.router=smoe",
        "moe.zero_experts=1",
        "moe.copy_experts=1",
        "moe.constant_experts=1",
        "moe.gating_residual=true",
        "train.top_k_schedule=random_uniform",
        "train.top_k_max=7",
        "train.top_k_per_layer=true",
        "eval.top_ks=[1,7]",
    )
    assert main(args) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert set(results["by_top_k"]) == {"1", "7"}
    for k, per_layer in results["mean_k"].items():  # FFN experts only: at most k, at most 4
        assert all(0 <= v <= min(int(k), 4) for v in per_layer)
    from hyperrouter.analysis.analyze import analyze_run

    analysis = analyze_run(out, max_tokens=64, diversity_tokens=16, make_plots=False)
    for layer in analysis["layers"]:  # the choices counted over FFN and zero-computation experts
        assert len(layer["tokens_per_expert"]) == 4 + 3
