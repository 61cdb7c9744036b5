"""`hyperrouter scaling fit`: recovers known coefficients, handles degenerate designs, refuses
bad input with one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hyperrouter.analysis.scaling import (
    dense_equivalent,
    expert_parameters,
    fit_routed_law,
    saturated_experts,
)
from hyperrouter.cli import main
from hyperrouter.errors import HyperRouterError
from hyperrouter.train.config import RunConfig

TRUE = {"a": -0.08, "b": -0.05, "c": 0.003, "d": 1.9}
SIZES = (2e5, 8e5, 3.2e6, 1.28e7)
EXPERTS = (1, 4, 8, 16, 32)


def law(N, E, coef=TRUE, e_prime=None):
    log_e = np.log(E if e_prime is None else e_prime)
    log_n = np.log(N)
    return np.exp(coef["a"] * log_n + coef["b"] * log_e + coef["c"] * log_n * log_e + coef["d"])


def grid(noise=0.003, seed=0, repeats=2):
    rng = np.random.default_rng(seed)
    N, E = np.meshgrid(SIZES, EXPERTS)
    N, E = np.tile(N.ravel(), repeats), np.tile(E.ravel(), repeats)
    return N, E, law(N, E) * np.exp(rng.normal(0, noise, N.size))


def test_recovers_known_coefficients_within_their_uncertainty() -> None:
    N, E, L = grid()
    fit = fit_routed_law(N, E, L)
    assert fit["terms"] == ["a", "b", "c", "d"] and fit["reduced"] == ""
    for key, value in TRUE.items():
        assert abs(fit["coefficients"][key] - value) < 4 * fit["stderr"][key], key
    assert fit["r2"] > 0.98 and fit["points"] == N.size


def test_exact_data_is_fitted_exactly() -> None:
    N, E, _ = grid(noise=0.0, repeats=1)
    fit = fit_routed_law(N, E, law(N, E))
    for key, value in TRUE.items():
        assert fit["coefficients"][key] == pytest.approx(value, abs=1e-8)
    assert fit["rmse_log_loss"] < 1e-10


def test_saturating_fit_recovers_the_transform() -> None:
    experts = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256])
    N, E = np.meshgrid(SIZES, experts)
    N, E = N.ravel(), E.ravel()
    L = law(N, E, e_prime=saturated_experts(E, 3.0, 60.0))
    fit = fit_routed_law(N, E, L, saturate=True)
    c = fit["coefficients"]
    assert c["E_start"] == pytest.approx(3.0, rel=1e-3)
    assert c["E_max"] == pytest.approx(60.0, rel=1e-3)
    assert c["b"] == pytest.approx(TRUE["b"], abs=1e-5)
    assert "Clark" in fit["E_prime_provenance"]
    assert fit["E_prime"] == "1/E' = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max"


def test_saturating_transform_properties() -> None:
    e = saturated_experts(np.array([1.0, 1e9]), 3.0, 60.0)
    assert e[0] == pytest.approx(3.0) and e[1] == pytest.approx(60.0, rel=1e-6)
    # Clark et al.'s S-BASE constants as quoted by later papers: E'(1) = E_start, E'(512) ~ 195
    sbase = saturated_experts(np.array([1.0, 2.0, 64.0, 512.0]), 1.847, 314.478)
    np.testing.assert_allclose(sbase, [1.847, 2.83, 53.8, 194.9], rtol=2e-3)
    small = saturated_experts(np.arange(1.0, 9.0), 2.0, 1e9)  # E' = E + 1 while E << E_max
    np.testing.assert_allclose(small, np.arange(1.0, 9.0) + 1.0, rtol=1e-6)


def test_single_size_fits_the_reduced_law() -> None:
    E = np.array(EXPERTS, dtype=float)
    N = np.full_like(E, 1e6)
    fit = fit_routed_law(N, E, law(N, E))
    assert fit["terms"] == ["b", "d"] and "one model size" in fit["reduced"]


def test_single_expert_count_fits_the_reduced_law() -> None:
    N = np.array(SIZES)
    fit = fit_routed_law(N, np.ones_like(N), law(N, np.ones_like(N)))
    assert fit["terms"] == ["a", "d"] and fit["coefficients"]["a"] == pytest.approx(TRUE["a"])


@pytest.mark.parametrize(
    "N,E,message",
    [
        ([1e6, 1e6], [1, 1], "one model size and one expert count"),
        ([1e5, 1e6, 1e5, 1e6], [1, 1, 8, 8], r"4 run\(s\) cannot fit 4 coefficients"),
        ([1e5, 1e6, 1e7], [1, 4, 16], "do not separate"),
    ],
)
def test_degenerate_designs_are_refused(N, E, message) -> None:
    # the third: N and E move together, so log N log E' is not separable from the others
    N = np.array(N * 2, dtype=float) if len(N) == 3 else np.array(N, dtype=float)
    E = np.array(E * 2, dtype=float) if len(E) == 3 else np.array(E, dtype=float)
    with pytest.raises(HyperRouterError, match=message):
        fit_routed_law(N, E, law(N, E))


def test_saturate_needs_four_expert_counts() -> None:
    N, E = np.meshgrid(SIZES, [1, 8, 32])
    with pytest.raises(HyperRouterError, match="4 or more expert counts"):
        fit_routed_law(N.ravel(), E.ravel(), law(N.ravel(), E.ravel()), saturate=True)


# --------------------------------------------------------------------------- runs and the CLI


def _write_run(folder, N, E, router="smoe", loss=None, seed=0):
    cfg = RunConfig()
    cfg.model.d_model, cfg.moe.d_expert = 32, 16
    cfg.train.top_k_min = cfg.train.top_k_max = 1
    cfg.eval.top_ks = [1, 2]
    if E == 1:
        cfg.moe.layers = []
    else:
        cfg.moe.num_experts, cfg.moe.router = E, router
    unused = 0 if E == 1 else (E - 1) * expert_parameters(cfg) * len(cfg.moe.layers)
    bpc = (law(N, E) if loss is None else loss) / math.log(2)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    results = {
        "metric": "bpc",
        "by_top_k": {"1": bpc, "2": bpc * 0.99},
        "parameters": {"trainable": int(N) + unused, "frozen": 0, "total": int(N) + unused},
    }
    (folder / "results.json").write_text(json.dumps(results))
    return cfg


def test_dense_equivalent_counts_one_expert_per_layer(tmp_path) -> None:
    cfg = _write_run(tmp_path / "r", 10_000, 8)
    one = 32 * 16 + 16 + 16 * 32 + 32  # w_in, b_in, w_out, b_out
    assert expert_parameters(cfg) == one
    total = 10_000 + 7 * one * len(cfg.moe.layers)
    assert dense_equivalent(cfg, total) == (10_000, 8)


def test_cli_fits_a_sweep_folder_and_writes_json(tmp_path, capsys) -> None:
    sweep = tmp_path / "sweep"
    for N in SIZES:
        for E in EXPERTS:
            for router in ("smoe", "hash"):
                if E == 1 and router == "hash":
                    continue
                name = "dense" if E == 1 else router
                _write_run(sweep / "runs" / f"{name}-E{E}-N{int(N)}", int(N), E, router)
    out = tmp_path / "fit"
    assert main(["scaling", "fit", str(sweep), "--out", str(out), "--router", "smoe"]) == 0
    text = capsys.readouterr().out
    assert "# smoe" in text and "R²" in text and "hash" not in text
    result = json.loads((out / "scaling.json").read_text())
    fit = result["groups"]["smoe"]
    assert fit["points"] == len(SIZES) * len(EXPERTS)
    for key in ("a", "b", "c", "d"):
        assert fit["coefficients"][key] == pytest.approx(TRUE[key], abs=1e-3)


@pytest.mark.parametrize(
    "args,message",
    [
        (["MISSING"], "no such run or sweep folder"),
        (["EMPTY"], "neither a finished run"),
        (["ONE", "--top-k", "4"], "no test value at k=4"),
        (["ONE"], "one model size and one expert count"),
        (["ONE", "--router", "xmoe"], "no such router among the runs"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, message) -> None:
    (tmp_path / "EMPTY").mkdir()
    _write_run(tmp_path / "ONE" / "runs" / "a", 10_000, 8)
    _write_run(tmp_path / "ONE" / "runs" / "b", 10_000, 8)
    argv = [str(tmp_path / a) if a.isupper() else a for a in args]
    assert main(["scaling", "fit", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_saturating_fit_of_runs_without_saturation_reports_instead_of_crashing() -> None:
    """Noisy losses with no trend in E (like a small real grid) drive E_start and E_max to a
    flat corner: the fit must still return, with its notes, not raise from the linear algebra."""
    rng = np.random.default_rng(0)
    N, E = np.meshgrid([7e4, 1.5e5, 2.6e5], [1, 4, 8, 16, 32])
    N, E = N.ravel(), E.ravel()
    L = np.exp(0.75 - 0.02 * np.log(N) + 0.01 * rng.standard_normal(N.size))
    fit = fit_routed_law(N, E, L, saturate=True)
    assert math.isfinite(fit["r2"]) and fit["points"] == 15
    finite = all(math.isfinite(v) for v in fit["stderr"].values())
    assert finite or fit["reduced"]  # undetermined errors are said, not silently NaN
