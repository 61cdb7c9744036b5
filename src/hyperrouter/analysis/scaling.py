"""`hyperrouter scaling fit`: Clark et al. (2022)'s routed scaling law fitted to trained runs.

The law ("Unified Scaling Laws for Routed Language Models", arXiv 2202.01169, Eq. 1), with natural
logarithms, N in parameters and L the test loss in nats per token:

    log L(N, E) = a log N + b log E' + c log N log E' + d

E' is E, or with `saturate=True` the saturating transform (Clark et al.'s E-hat)

    1 / E' = 1 / (E - 1 + (1 / E_start - 1 / E_max)^-1) + 1 / E_max

with 0 < E_start < E_max fitted too. Properties: E' is increasing in E, E'(1) = E_start (not 1:
the dense points sit at E_start), E' ~ E - 1 + E_start for 1 <= E << E_max, and E' -> E_max as
E -> infinity. Provenance: the paper's own text could not be read here; this form is the one
quoted, identically, by several independent later papers and notes that cite Clark et al.
(checked 2026-12-03), which also quote the paper's fitted S-BASE values a = -0.082,
b = -0.108, c = 0.009, d = 1.104, E_start = 1.847, E_max = 314.478 (one note says the paper's
logarithms are base 10: a and b do not depend on the base, c and d do, c_e = c_10 / ln 10 and
d_e = d_10 ln 10). An earlier version of this module used 1 / (E_start - 1) in place of
1 / E_start, written from memory; that was wrong. The bilinear form itself (bilinear in log N
and log E) is the paper's.

What a run contributes (one point per run; seeds are separate points):
- N, the dense-equivalent size (Clark's "dense model" the routed one is built from, whose FFN is
  replicated into E experts; their routers are top-1, so N is also the parameters a token uses):
  every parameter of the run (results.json `parameters.total`) minus the (E - 1) experts per MoE
  layer that a token does not use. Embeddings, attention, norms, routers, shared experts and dense
  FFNs all count. One expert's worth is one expert of width moe.d_expert (with granularity m: m
  fine experts). A dense model counts all its parameters. Router `dense` (every expert on every
  token, outputs mixed) counts all experts and is treated as dense (E = 1); `smear` (one merged
  expert per sequence) counts one expert.
- E, experts per MoE layer (moe.num_experts before fine-grained segmentation); 1 for dense models.
- L, the test loss in nats at inference k = `top_k` (default 1: Clark's routers route top-1, so
  k = 1 matches N's one expert per layer). From results.json: bpc x ln 2, or ln(perplexity).
  Dense runs report one value, used at every k.

Runs are grouped by routing technique (moe.router), as Clark fits one law per technique; the dense
runs (E = 1) join every group. With one size (or one expert count) in a group the terms that need
it to vary cannot be fitted: the reduced law without them is fitted and the result says so.
Uncertainties are standard errors from the residual variance s^2 = RSS / (n - p) and
s^2 (X^T X)^-1 (for the saturating fit, J^T J of the residuals' Jacobian in the six parameters),
so a fit needs at least p + 1 points.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hyperrouter.errors import HyperRouterError

SATURATION_FORMULA = "1/E' = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max"
SATURATION_PROVENANCE = (
    "as quoted identically by several later papers citing Clark et al. 2022; "
    "the paper's own text was not available to check"
)
# the search range of the saturating fit: E_start in [0.1, 100 max E], E_max - E_start in
# [0.01, 1e6 max E]; beyond it the transform is numerically flat or singular, and noisy runs can
# push the search there
E_START_RANGE = (0.1, 100.0)  # the upper end in units of max E
E_GAP_RANGE = (0.01, 1e6)  # the upper end in units of max E
TERMS = {"a": "log N", "b": "log E'", "c": "log N log E'", "d": "1"}
DENSE_GROUP = "dense"


@dataclass
class RunPoint:
    """One run as a point of the law."""

    path: str
    router: str
    n_params: int
    num_experts: int
    loss: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "router": self.router,
            "N": self.n_params,
            "E": self.num_experts,
            "loss_nats": self.loss,
        }


# --------------------------------------------------------------------------- reading runs


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run folders (config.json + results.json) named directly or inside sweeps (runs/*/)."""
    if not paths:
        raise HyperRouterError("scaling fit needs at least one RUN_OR_SWEEP folder")
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise HyperRouterError(f"{given}: no such run or sweep folder")
        if not path.is_dir():
            raise HyperRouterError(f"{given}: is a file, not a run or sweep folder")
        if (path / "results.json").is_file() and (path / "config.json").is_file():
            found.append(path)
            continue
        runs = sorted(
            p
            for p in (path / "runs").glob("*")
            if (p / "results.json").is_file() and (p / "config.json").is_file()
        )
        if not runs:
            raise HyperRouterError(
                f"{given}: neither a finished run (config.json + results.json) nor a sweep "
                f"holding finished runs in runs/*/"
            )
        found.extend(runs)
    unique: list[Path] = []
    for p in found:
        if p.resolve() not in {u.resolve() for u in unique}:
            unique.append(p)
    return unique


def expert_parameters(config: Any) -> int:
    """Parameters of one expert of width moe.d_expert (granularity m: m fine experts)."""
    from hyperrouter.moe.experts import Experts

    moe, model = config.moe, config.model
    m = moe.granularity
    fine = Experts(1, model.d_model, moe.d_expert // m, activation=moe.activation, bias=True)
    return m * sum(p.numel() for p in fine.parameters())


def dense_equivalent(config: Any, total: int) -> tuple[int, int]:
    """(N, E) of a run: see the module docstring."""
    moe = config.moe
    if not moe.layers or moe.router == "dense":
        return total, 1
    unused = (moe.num_experts - 1) * expert_parameters(config) * len(moe.layers)
    return total - unused, moe.num_experts


def loss_in_nats(results: dict, top_k: int, dense: bool, where: str) -> float:
    metric = results.get("metric")
    by_k = results.get("by_top_k", {})
    key = "1" if dense else str(top_k)
    if key not in by_k:
        have = ", ".join(by_k) or "none"
        raise HyperRouterError(
            f"{where}: results.json has no test value at k={top_k} (has k = {have}); "
            f"choose another --top-k"
        )
    value = float(by_k[key])
    if metric == "bpc":
        return value * math.log(2)
    if metric == "ppl":
        return math.log(value)
    raise HyperRouterError(f"{where}: metric {metric!r} is not a language-model loss (bpc or ppl)")


def read_point(run_dir: Path, top_k: int = 1) -> RunPoint:
    from hyperrouter.train.config import config_from_dict

    try:
        config = config_from_dict(json.loads((run_dir / "config.json").read_text()))
        results = json.loads((run_dir / "results.json").read_text())
        total = int(results["parameters"]["total"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise HyperRouterError(
            f"{run_dir}: unreadable config.json or results.json ({err})"
        ) from None
    n_params, num_experts = dense_equivalent(config, total)
    dense = num_experts == 1 and (not config.moe.layers or config.moe.router == "dense")
    router = DENSE_GROUP if dense else config.moe.router
    loss = loss_in_nats(results, top_k, dense, str(run_dir))
    if not loss > 0 or not math.isfinite(loss):
        raise HyperRouterError(f"{run_dir}: test loss {loss} nats is not positive and finite")
    return RunPoint(str(run_dir), router, n_params, num_experts, loss)


# --------------------------------------------------------------------------- the law


def saturated_experts(E: np.ndarray, e_start: float, e_max: float) -> np.ndarray:
    """E' of the saturating transform (SATURATION_FORMULA, see the module docstring)."""
    E = np.asarray(E, dtype=float)
    offset = 1.0 / (1.0 / e_start - 1.0 / e_max)
    return 1.0 / (1.0 / (E - 1.0 + offset) + 1.0 / e_max)


def _design(log_n: np.ndarray, log_e: np.ndarray, terms: list[str]) -> np.ndarray:
    columns = {"a": log_n, "b": log_e, "c": log_n * log_e, "d": np.ones_like(log_n)}
    return np.stack([columns[t] for t in terms], axis=1)


def predict(coef: dict[str, float], N: np.ndarray, E: np.ndarray) -> np.ndarray:
    """L(N, E) in nats from a fit's coefficients (missing terms count as 0)."""
    log_n = np.log(np.asarray(N, dtype=float))
    e = np.asarray(E, dtype=float)
    if "E_start" in coef:
        e = saturated_experts(e, coef["E_start"], coef["E_max"])
    log_e = np.log(e)
    log_l = (
        coef.get("a", 0.0) * log_n
        + coef.get("b", 0.0) * log_e
        + coef.get("c", 0.0) * log_n * log_e
        + coef.get("d", 0.0)
    )
    return np.exp(log_l)


def fit_routed_law(N: Any, E: Any, loss: Any, *, saturate: bool = False) -> dict[str, Any]:
    """Least-squares fit of log L = a log N + b log E' + c log N log E' + d.

    N, E, loss: sequences of equal length (parameters, experts per layer, nats). Returns
    coefficients, standard errors, R^2 and RMSE of log L, the number of points, the terms fitted
    and a note when the design forced a reduced law. Raises HyperRouterError when there are too few
    points or the design cannot separate the terms."""
    N = np.asarray(N, dtype=float)
    E = np.asarray(E, dtype=float)
    y = np.log(np.asarray(loss, dtype=float))
    n = len(y)
    if not (len(N) == len(E) == n):
        raise HyperRouterError(f"N, E and loss differ in length: {len(N)}, {len(E)}, {n}")
    if n == 0:
        raise HyperRouterError("no runs to fit")
    if np.any(N <= 0) or np.any(E < 1) or not np.all(np.isfinite(y)):
        raise HyperRouterError("N must be > 0, E >= 1 and every loss positive and finite")
    sizes, counts = np.unique(N).size, np.unique(E).size
    terms, dropped = ["a", "b", "c", "d"], []
    if sizes < 2:
        terms = [t for t in terms if t not in ("a", "c")]
        dropped.append(f"one model size (N = {int(N[0]):,}): a and c need two or more")
    if counts < 2:
        terms = [t for t in terms if t not in ("b", "c")]
        dropped.append(f"one expert count (E = {int(E[0])}): b and c need two or more")
    if terms == ["d"]:
        raise HyperRouterError(
            f"the {n} run(s) share one model size and one expert count: nothing to fit; "
            f"add runs of other sizes (--sizes) or expert counts (--experts)"
        )
    if saturate and "b" not in terms:
        raise HyperRouterError("--saturate needs runs of several expert counts (--experts)")
    if saturate and counts < 4:
        raise HyperRouterError(
            f"--saturate fits E_start and E_max too: it needs 4 or more expert counts "
            f"(dense = 1 counts), got {counts}: {', '.join(str(int(e)) for e in np.unique(E))}"
        )
    p = len(terms) + (2 if saturate else 0)
    if n < p + 1:
        raise HyperRouterError(
            f"{n} run(s) cannot fit {p} coefficients with an uncertainty: need at least {p + 1} "
            f"(one more than the coefficients {', '.join(terms)}"
            + (", E_start, E_max" if saturate else "")
            + ")"
        )
    log_n = np.log(N)
    if saturate:
        coef, cov, resid = _fit_saturated(log_n, E, y, terms)
    else:
        X = _design(log_n, np.log(E), terms)
        rank = np.linalg.matrix_rank(X)
        if rank < len(terms):
            raise HyperRouterError(
                f"the runs do not separate the law's terms (design rank {rank} < {len(terms)}): "
                f"vary model size and expert count independently (a grid of --sizes x --experts)"
            )
        beta, *_ = np.linalg.lstsq(X, y, rcond=None)
        resid = y - X @ beta
        s2 = float(resid @ resid) / (n - p)
        cov = s2 * np.linalg.inv(X.T @ X)
        coef = dict(zip(terms, beta.tolist()))
    names = list(coef)
    stderr = dict(zip(names, np.sqrt(np.clip(np.diag(cov), 0.0, None)).tolist()))
    if saturate and not all(math.isfinite(v) for v in stderr.values()):
        dropped.append("the saturating fit ended where its errors are not defined")
    low, high = E_START_RANGE[0], E_START_RANGE[1] * E.max()
    if saturate and not low * 1.0001 < coef["E_start"] < high * 0.9999:
        dropped.append(
            f"E_start = {coef['E_start']:.3g} is at the search bound [{low:g}, {high:g}]: "
            f"these runs do not determine it"
        )
    if saturate and coef["E_max"] > 1e4 * E.max():
        stderr["E_max"] = float("nan")
        dropped.append(
            f"E_max ran off to {coef['E_max']:.3g}: these runs show no saturation, so it is "
            f"not determined (nor its error)"
        )
    rss = float(resid @ resid)
    tss = float(((y - y.mean()) ** 2).sum())
    return {
        "law": "log L = a log N + b log E' + c log N log E' + d (natural logs, L in nats)",
        "E_prime": SATURATION_FORMULA if saturate else "E' = E",
        "E_prime_provenance": SATURATION_PROVENANCE if saturate else "",
        "terms": terms,
        "coefficients": coef,
        "stderr": stderr,
        "r2": 1.0 - rss / tss if tss > 0 else float("nan"),
        "rmse_log_loss": math.sqrt(rss / n),
        "points": n,
        "parameters_fitted": p,
        "reduced": "; ".join(dropped),
    }


def _fit_saturated(
    log_n: np.ndarray, E: np.ndarray, y: np.ndarray, terms: list[str]
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Variable projection: for (E_start, E_max) the linear coefficients are least squares; the
    two saturation constants are searched by scipy.optimize.least_squares from several starts."""
    from scipy.optimize import least_squares

    def unpack(theta: np.ndarray) -> tuple[float, float]:
        e_start = math.exp(theta[0])
        return e_start, e_start + math.exp(theta[1])

    def linear(e_start: float, e_max: float) -> tuple[np.ndarray, np.ndarray]:
        X = _design(log_n, np.log(saturated_experts(E, e_start, e_max)), terms)
        beta, *_ = np.linalg.lstsq(X, y, rcond=None)
        return beta, y - X @ beta

    def residuals(theta: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return linear(*unpack(theta))[1]

    top = float(E.max())
    lower = np.log([E_START_RANGE[0], E_GAP_RANGE[0]])
    upper = np.log([E_START_RANGE[1] * top, E_GAP_RANGE[1] * top])
    best = None
    for start in (1.5, 2.0, 4.0):
        for scale in (2.0, 10.0, 100.0):
            theta0 = np.array([math.log(start), math.log(scale * top)])
            sol = least_squares(
                residuals, theta0, bounds=(lower, upper), method="trf", max_nfev=2000
            )
            if best is None or sol.cost < best.cost:
                best = sol
    e_start, e_max = unpack(best.x)
    beta, resid = linear(e_start, e_max)
    coef = dict(zip(terms, beta.tolist())) | {"E_start": e_start, "E_max": e_max}
    names = list(coef)

    def model(values: np.ndarray) -> np.ndarray:
        c = dict(zip(names, values))
        return np.log(predict(c, np.exp(log_n), E))

    x0 = np.array([coef[k] for k in names])
    J = np.empty((len(y), len(names)))
    with np.errstate(all="ignore"):  # a degenerate corner gives inf/nan, handled below
        _jacobian(model, x0, J)
    s2 = float(resid @ resid) / (len(y) - len(names))
    cov = np.full((len(names), len(names)), float("nan"))  # at a flat or singular corner
    if np.all(np.isfinite(J)):
        try:
            cov = s2 * np.linalg.pinv(J.T @ J)
        except np.linalg.LinAlgError:
            pass
    return coef, cov, resid


def _jacobian(model, x0: np.ndarray, out: np.ndarray) -> None:
    """Central differences of model at x0 into out [points, parameters]."""
    for i in range(len(x0)):
        h = 1e-6 * max(1.0, abs(x0[i]))
        up, down = x0.copy(), x0.copy()
        up[i] += h
        down[i] -= h
        out[:, i] = (model(up) - model(down)) / (2 * h)


# --------------------------------------------------------------------------- groups, output


def fit_groups(
    points: list[RunPoint], *, saturate: bool = False, routers: list[str] | None = None
) -> dict[str, Any]:
    """One fit per router (each with the dense runs as its E = 1 points)."""
    dense = [p for p in points if p.router == DENSE_GROUP]
    names = sorted({p.router for p in points if p.router != DENSE_GROUP})
    if routers is not None:
        unknown = [r for r in routers if r not in names and r != DENSE_GROUP]
        if unknown:
            raise HyperRouterError(
                f"--router {','.join(unknown)}: no such router among the runs; "
                f"have: {', '.join(names + ([DENSE_GROUP] if dense else [])) or 'none'}"
            )
        names = [r for r in names if r in routers]
    groups: dict[str, Any] = {}
    if not names:
        groups[DENSE_GROUP] = (dense, fit_routed_law(*_arrays(dense), saturate=False))
    for name in names:
        members = dense + [p for p in points if p.router == name]
        try:
            fit = fit_routed_law(*_arrays(members), saturate=saturate)
        except HyperRouterError as err:
            raise HyperRouterError(f"router {name}: {err}") from None
        groups[name] = (members, fit)
    return groups


def _arrays(points: list[RunPoint]) -> tuple[list[int], list[int], list[float]]:
    return [p.n_params for p in points], [p.num_experts for p in points], [p.loss for p in points]


def run_scaling_fit(
    paths: list[str | Path],
    out: str | Path | None = None,
    *,
    top_k: int = 1,
    saturate: bool = False,
    routers: list[str] | None = None,
) -> dict[str, Any]:
    """Read the runs, fit the law per router, write scaling.json (and scaling.png) to `out`."""
    if top_k < 1:
        raise HyperRouterError(f"--top-k must be >= 1, got {top_k}")
    points = [read_point(d, top_k) for d in find_run_dirs(paths)]
    groups = fit_groups(points, saturate=saturate, routers=routers)
    result = {
        "top_k": top_k,
        "N": "parameters a token uses: all minus the (E - 1) unused experts per MoE layer",
        "loss": f"test loss in nats at inference k = {top_k} (dense runs: their one value)",
        "groups": {
            name: fit | {"runs": [p.as_dict() for p in members]}
            for name, (members, fit) in groups.items()
        },
    }
    if out is not None:
        from hyperrouter.train.checkpoint import write_json_atomic

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "scaling.json", result)
        plot = plot_fits(result, out / "scaling.png")
        result["files"] = [str(out / "scaling.json")] + ([str(plot)] if plot else [])
    return result


def plot_fits(result: dict[str, Any], path: Path) -> Path | None:
    """L vs N on log axes: the points and the fitted curve for each E, one panel per router."""
    from hyperrouter.analysis.plots import _pyplot

    plt = _pyplot()
    if plt is None:
        return None
    groups = result["groups"]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, fit) in zip(axes[0], groups.items()):
        runs = fit["runs"]
        n_all = np.array([r["N"] for r in runs], dtype=float)
        grid = np.geomspace(n_all.min() / 1.2, n_all.max() * 1.2, 64)
        for i, e in enumerate(sorted({r["E"] for r in runs})):
            color = colors[i % len(colors)]
            mine = [r for r in runs if r["E"] == e]
            ax.scatter([r["N"] for r in mine], [r["loss_nats"] for r in mine], color=color)
            curve = predict(fit["coefficients"], grid, np.full_like(grid, e))
            ax.plot(grid, curve, color=color, label=f"E = {e}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (dense-equivalent parameters)")
        ax.set_ylabel(f"test loss (nats), k = {result['top_k']}")
        ax.set_title(f"{name}: R² = {fit['r2']:.3f}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_report(result: dict[str, Any]) -> str:
    """Coefficients ± standard errors, R^2, RMSE and points, per router."""
    lines = []
    for name, fit in result["groups"].items():
        lines.append(f"# {name}: {fit['law']}; {fit['E_prime']}")
        if fit["E_prime_provenance"]:
            lines.append(f"#   E' {fit['E_prime_provenance']}")
        if fit["reduced"]:
            lines.append(f"#   reduced law: {fit['reduced']}")
        for key, value in fit["coefficients"].items():
            term = TERMS.get(key, "saturation")
            lines.append(f"  {key:<8} {value:>12.5g} ± {fit['stderr'][key]:<10.3g} ({term})")
        lines.append(
            f"  R² {fit['r2']:.4f}   RMSE(log L) {fit['rmse_log_loss']:.4g}   "
            f"points {fit['points']} (coefficients {fit['parameters_fitted']})"
        )
    return "\n".join(lines)
