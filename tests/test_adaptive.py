"""Per-input k (oracle, predictor, cascade) on constructed cases where the right k is known, and
the `hyperrouter adaptive` command end to end on a tiny trained run."""

from __future__ import annotations

import json

import pytest
import torch

from hyperrouter.analysis.adaptive import (
    KPredictor,
    oracle_choice,
    run_cascade,
    run_pass,
    run_predictor,
)
from hyperrouter.cli import main
from hyperrouter.errors import HyperRouterError
from hyperrouter.train.config import load_config
from tests.conftest import TINY_MOE, train_tiny_run

KS = [1, 2, 4]


def test_oracle_picks_the_cheapest_k_within_the_tolerance() -> None:
    # 2 segments x 3 columns; rows: k = 1, 2, 4
    losses = torch.tensor(
        [
            [[1.50, 1.00, 2.00], [1.00, 1.30, 0.90]],
            [[1.20, 0.99, 1.80], [1.00, 1.20, 0.95]],
            [[1.19, 1.00, 1.70], [1.10, 1.00, 1.00]],
        ]
    )
    assert oracle_choice(losses, KS, 0.0).tolist() == [[2, 0, 2], [0, 2, 0]]
    # a smaller k better than the largest counts as within (column 1 of segment 0: k = 1)
    assert oracle_choice(losses, KS, 0.011).tolist() == [[1, 0, 2], [0, 2, 0]]
    assert oracle_choice(losses, KS, 0.25).tolist() == [[1, 0, 1], [0, 1, 0]]
    assert oracle_choice(losses, KS, 0.31).tolist() == [[0, 0, 0], [0, 0, 0]]
    assert oracle_choice(losses, KS, 10.0).eq(0).all()
    with pytest.raises(HyperRouterError, match="tolerance"):
        oracle_choice(losses, KS, -0.1)


def test_predictor_learns_a_separable_rule() -> None:
    torch.manual_seed(0)
    x = torch.randn(300, 3)
    y = (x[:, 0] > 0.5).long() + (x[:, 0] > -0.5).long()  # k index from the previous loss
    predictor = KPredictor(3).fit(x, y)
    assert (predictor.predict(x) == y).float().mean() > 0.95
    assert predictor.macs == 3 * 4


@pytest.fixture(scope="module")
def tiny():
    config = load_config(
        "quick",
        [
            *TINY_MOE,
            *("train.tgt_len=8", "train.mem_len=8", "eval.tgt_len=8", "eval.batch_size=3"),
            "eval.top_ks=[1,2,4]",
        ],
    )
    torch.manual_seed(0)
    model = config.build_model(30)
    data = torch.randint(0, 30, (8 * 3 * 5 + 1,))
    return model, config, data


def _same(a, b) -> None:
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)


def test_per_column_k_equals_static_k_where_every_column_picks_it(tiny) -> None:
    model, config, data = tiny
    cpu = torch.device("cpu")
    for index, k in enumerate(KS):
        always = KPredictor(len(KS))
        always.bias[index] = 1.0
        result, chosen = run_predictor(model, data, config, cpu, always, KS)
        assert chosen[1:].eq(index).all() and chosen[0].eq(len(KS) - 1).all()
        static = run_pass(model, data, config, cpu, k=k)
        # the first segment runs at the largest k (nothing known yet), the memory then differs
        assert result.mean_k[0] < KS[-1] or k == KS[-1]
        if k == KS[-1]:
            _same(result, static)


def test_mixed_columns_match_their_static_runs(tiny) -> None:
    """Columns are independent: a column pinned to k gets static k's losses in a mixed batch."""
    model, config, data = tiny
    cpu = torch.device("cpu")

    class Pinned(KPredictor):
        def predict(self, x):  # column c always at KS[c]
            return torch.arange(len(KS))

    result, chosen = run_predictor(model, data, config, cpu, Pinned(len(KS)), KS)
    for c, k in enumerate(KS):
        static = run_pass(model, data, config, cpu, k=k)
        torch.testing.assert_close(result.loss[1:, c], static.loss[1:, c], rtol=1e-5, atol=1e-6)


def test_cascade_escalates_below_the_threshold(tiny) -> None:
    model, config, data = tiny
    cpu = torch.device("cpu")
    never, share = run_cascade(model, data, config, cpu, 1, 4, float("-inf"))
    assert share == 0.0
    _same(never, run_pass(model, data, config, cpu, k=1))
    always, share = run_cascade(model, data, config, cpu, 1, 4, float("inf"))
    assert share == 1.0
    _same(always, run_pass(model, data, config, cpu, k=4))
    assert always.mean_k == pytest.approx([5.0, 5.0])  # k = 1 for everyone, then k = 4 again
    # a threshold between the columns' confidences escalates exactly the less confident ones
    probe = run_pass(model, data, config, cpu, k=1, confidence=True, max_batches=1)
    conf = probe.confidence[0]
    threshold = float(conf.median())
    _, share = run_cascade(model, data, config, cpu, 1, 4, threshold, max_batches=1)
    assert share == pytest.approx(float((conf < threshold).float().mean()))


def test_adaptive_command(tmp_path, capsys) -> None:
    run = train_tiny_run(tmp_path / "run", steps=4)
    capsys.readouterr()
    command = ["adaptive", str(run), "--max-batches", "3", "--no-progress"]
    assert main([*command, "--top-p", "0.5,1", "--ratio", "0"]) == 0
    text = capsys.readouterr().out
    assert "oracle" in text and "predictor" in text and "cascade" in text and "AIQ" in text
    result = json.loads((run / "adaptive.json").read_text())
    static = {row["k"]: row for row in result["static"]}
    assert sorted(static) == [1, 2, 4]
    top_p = {row["param"]: row for row in result["policies"]["top_p"]}
    ratio0 = result["policies"]["ratio"][0]
    # p = 1 and r = 0 keep every slot: static k = E, same quality and cost
    for row in (top_p[1.0], ratio0):
        assert row["mean_k"] == 4.0
        assert row["value"] == pytest.approx(static[4]["value"], rel=1e-6)
        assert row["macs_per_token"] == static[4]["macs_per_token"]
    assert static[1]["macs_per_token"] < top_p[0.5]["macs_per_token"] <= static[4]["macs_per_token"]
    for name in ("top_p", "ratio", "oracle", "predictor", "cascade", "static"):
        assert name in result["aiq"]
    for bad, needle in (
        (["--top-p", "1.5"], "top-p p must be in (0, 1]"),
        (["--per-input", "magic"], "--per-input: unknown magic"),
        (["--cascade", "4,1"], "--cascade needs two k"),
        (["--k-max", "9"], "--k-max must be in [1, 4]"),
        (["--tolerance", "-1"], "--tolerance values must be >= 0"),
    ):
        assert main([*command, *bad]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1
