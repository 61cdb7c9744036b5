"""`hyperrouter compare`: train several routing methods under one budget and tabulate them.

Every method is the base config with a few keys changed, so everything else (steps, tokens,
optimizer, LR schedule, model sizes) is identical. The methods are data, in
configs/compare/methods.yaml (hyperrouter, smoe_dropout, smoe, all_experts, dense_ffn,
dense_ffn_dropout and the classic routers with their natural k); every registered router name is a
method too (that router with default options and the base's schedule). `dense` is refused as
ambiguous: `dense_ffn` is the dense-FFN model, `all_experts` the MoE model with router 'dense'.

Seeds are train.seed + i. Runs live in SWEEP_DIR/runs/<method>-seed<seed>; finished runs are
reused and an interrupted one resumes from its last checkpoint, so re-running the command
continues a sweep; a run folder whose config is not the method's is refused, never reused.

Grid axes (for scaling laws), both optional: `experts` (moe.num_experts values) and `sizes`
(model.d_model values). A size D scales every width of the base by D / base d_model: d_inner,
moe.d_expert (rounded to a multiple of moe.granularity), d_head and d_embed (if set); n_layer and
n_head stay. An expert count E sets moe.num_experts = E and clips k to the E * granularity experts:
eval.top_ks above it are dropped, the schedule's top_k_min/max are capped at it. Each method is
multiplied into the grid; a dense method that does not depend on E (no MoE layers and no
d_inner_from_experts) runs once per size. Cells are labelled <method>[-E<E>][-d<D>] (the parts
of the axes given) and runs live in runs/<label>-seed<seed>; summary.json's `methods`, the table
and the CSV are keyed by label, each entry naming its method, num_experts and d_model. Without
the axes everything is as before (labels are the method names).
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from hyperrouter import distributed
from hyperrouter.analysis import plots
from hyperrouter.analysis.analyze import ANALYSIS_KEYS, analyze_run
from hyperrouter.bench import machine_description
from hyperrouter.data.corpus import load_corpus
from hyperrouter.errors import HyperRouterError
from hyperrouter.routers import ROUTERS
from hyperrouter.train import checkpoint as ckpt
from hyperrouter.train import runlock
from hyperrouter.train.config import (
    RunConfig,
    apply_overrides,
    config_diff,
    config_from_dict,
    load_raw,
    load_yaml,
)
from hyperrouter.train.trainer import train_run

DEFAULT_BASE = "enwik8-hyperrouter-cpu"
SWEEP_FILE = "sweep.json"
AMBIGUOUS = {
    "dense": "'dense' is ambiguous: use dense_ffn (a dense FFN model with the experts' parameters) "
    "or all_experts (the MoE model with router 'dense', every expert per token)",
    "dense_dropout": "method 'dense_dropout' is now called dense_ffn_dropout",
}


def method_presets() -> dict[str, dict[str, Any]]:
    """The method presets (configs/compare/methods.yaml), by name."""
    text = resources.files("hyperrouter").joinpath("configs/compare/methods.yaml").read_text()
    return load_yaml(text)


def methods_available() -> list[str]:
    """Every method name `--methods` accepts: the presets, then the other registered routers."""
    presets = method_presets()
    return [*presets, *sorted(r for r in ROUTERS if r not in presets and r not in AMBIGUOUS)]


def method_overrides(method: str, base: RunConfig) -> list[str]:
    """The `--set` overrides that turn the base config into `method`."""
    if method in AMBIGUOUS:
        raise HyperRouterError(AMBIGUOUS[method])
    presets = method_presets()
    if method in presets:
        spec = presets[method]
    elif method in ROUTERS:
        spec = {"set": {"moe.router": method, "moe.router_options": {}}}
    else:
        raise HyperRouterError(
            f"unknown method {method!r}; valid: {', '.join(methods_available())}"
        )
    settings = dict(spec.get("set", {}))
    if spec.get("keep_router_options") and base.moe.router == settings.get("moe.router"):
        settings["moe.router_options"] = base.moe.router_options
    elif "moe.router" in settings:
        settings.setdefault("moe.router_options", {})
    if spec.get("d_inner_from_experts"):
        settings["model.d_inner"] = base.moe.num_experts * base.moe.d_expert
    if spec.get("d_inner_from_one_expert"):
        settings["model.d_inner"] = base.moe.d_expert
    if "top_k" in spec:  # a number, or `all`: every expert of the base (a variable-k router's cap)
        k = base.moe.total_experts if spec["top_k"] == "all" else int(spec["top_k"])
        settings.update(
            {"train.top_k_schedule": "constant", "train.top_k_min": k, "train.top_k_max": k}
        )
    return [f"{key}={json.dumps(value)}" for key, value in settings.items()]


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    valid = methods_available()
    if not methods:
        raise HyperRouterError(f"--methods needs at least one of {', '.join(valid)}")
    for m in methods:
        if m in AMBIGUOUS:
            raise HyperRouterError(AMBIGUOUS[m])
    unknown = [m for m in methods if m not in valid]
    if unknown:
        raise HyperRouterError(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    if len(set(methods)) != len(methods):
        raise HyperRouterError(f"--methods lists a method twice: {text}")
    return methods


class Sweep:
    """The runs of one comparison and the table made from them."""

    def __init__(
        self,
        out: str | Path,
        methods: list[str],
        seeds: int,
        base: str | None = None,
        data: str | None = None,
        overrides: list[str] | None = None,
        experts: list[int] | None = None,
        sizes: list[int] | None = None,
    ) -> None:
        if seeds < 1:
            raise HyperRouterError(f"--seeds must be >= 1, got {seeds}")
        _check_axis("--experts", experts)
        _check_axis("--sizes", sizes)
        self.out = Path(out)
        self.methods = methods
        raw = load_raw(base or DEFAULT_BASE)
        extra = list(overrides or [])
        if data is not None:
            extra.append(f"data.path={data}")
        raw = apply_overrides(raw, extra)
        self.base = config_from_dict(raw)
        self.raw = raw
        self.seeds = [self.base.train.seed + i for i in range(seeds)]
        self.cells = grid_cells(self.base, methods, experts, sizes)
        self.labels = list(self.cells)
        self.configs = {}
        for label, (m, e, d) in self.cells.items():
            cell_raw = apply_overrides(raw, axis_overrides(self.base, e, d))
            cell_base = config_from_dict(cell_raw)
            for s in self.seeds:
                self.configs[(label, s)] = config_from_dict(
                    apply_overrides(cell_raw, [*method_overrides(m, cell_base), f"train.seed={s}"])
                )
        # bad data fails here, before anything is written
        data_cfg = self.base.data
        load_corpus(data_cfg.path, kind=data_cfg.kind, vocab_size=data_cfg.vocab_size)
        distributed.on_main(self._check_or_create)

    # ------------------------------------------------------------------ sweep folder
    def _identity(self) -> dict[str, Any]:
        base = self.base.to_dict()
        base.pop("name", None)
        base.pop("description", None)
        return {"base": base}

    def _check_or_create(self) -> None:
        path = self.out / SWEEP_FILE
        if path.is_file():
            stored = ckpt.read_json(path)
            if stored.get("base"):  # with the keys added since it was written, at their defaults
                stored["base"] = _normalized_base(stored["base"])
            if stored.get("base") != self._identity()["base"]:
                diff = config_diff(
                    stored.get("base") or {}, self._identity()["base"], (), ("sweep", "given")
                )
                more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
                raise HyperRouterError(
                    f"{self.out} holds a sweep with a different configuration: "
                    f"{'; '.join(diff[:3])}{more}; use another --out or the same "
                    f"--config/--data/--set as before"
                )
            return
        if runlock.holds_files(self.out):
            raise HyperRouterError(f"{self.out} is not empty and holds no {SWEEP_FILE}")
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt.write_json_atomic(path, self._identity() | {"wall_seconds": {}})

    def run_dir(self, method: str, seed: int) -> Path:
        return self.out / "runs" / f"{method}-seed{seed}"

    def _check_run_config(self, method: str, seed: int) -> None:
        """A run folder is reused or resumed only if it was started with this method's config."""
        stored = self.run_dir(method, seed) / "config.json"
        if not stored.is_file():
            return
        have = config_from_dict(ckpt.read_json(stored)).to_dict()
        want = self.configs[(method, seed)].to_dict()
        for d in (have, want):
            d.pop("name", None)
            d.pop("description", None)
        if have != want:
            diff = _first_differences(have, want)
            raise HyperRouterError(
                f"{stored.parent} was trained with another config than method {method!r} "
                f"({diff}); move it away or choose another --out"
            )

    # ------------------------------------------------------------------ running
    def _job_status(self, method: str, seed: int) -> str:
        """finished | resume | train (a run killed before its first checkpoint starts over)."""
        run_dir = self.run_dir(method, seed)
        self._check_run_config(method, seed)
        if (run_dir / "results.json").is_file():
            return "finished"
        if (run_dir / "checkpoints" / ckpt.INDEX).is_file():
            return "resume"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        return "train"

    def run(self, progress: bool = True, log=print) -> dict[str, Any] | None:
        """Train every missing run, analyse and tabulate (under torchrun every rank trains;
        rank 0 decides what to run, analyses, writes the tables and returns the summary)."""
        main = distributed.current().is_main
        log = log if main else (lambda *_: None)
        jobs = [(m, s) for s in self.seeds for m in self.labels]
        state = distributed.on_main(lambda: ckpt.read_json(self.out / SWEEP_FILE))
        session_times: list[float] = []
        for i, (method, seed) in enumerate(jobs, 1):
            run_dir = self.run_dir(method, seed)
            name = run_dir.name
            status = distributed.on_main(lambda m=method, s=seed: self._job_status(m, s))
            if status == "finished":
                log(f"[{i}/{len(jobs)}] {name}: finished earlier, reused")
                continue
            remaining = len(jobs) - i + 1
            eta = ""
            if session_times:
                eta = f" (ETA {_duration(statistics.mean(session_times) * remaining)})"
            resume = status == "resume"
            log(f"[{i}/{len(jobs)}] {name}: {'resuming' if resume else 'training'}{eta}")
            start = time.perf_counter()
            train_run(
                None if resume else self.configs[(method, seed)],
                run_dir,
                resume=resume,
                progress=progress,
                log=log,
            )
            elapsed = time.perf_counter() - start
            session_times.append(elapsed)
            state["wall_seconds"][name] = state["wall_seconds"].get(name, 0.0) + elapsed
            if main:
                ckpt.write_json_atomic(self.out / SWEEP_FILE, state)
        if not main:
            return None
        for method, seed in jobs:
            run_dir = self.run_dir(method, seed)
            if not _analysis_is_current(run_dir / "analysis" / "analysis.json"):
                analyze_run(run_dir, make_plots=True)
        return self.summarize(state["wall_seconds"])

    # ------------------------------------------------------------------ summary
    def summarize(self, wall: dict[str, float]) -> dict[str, Any]:
        limit = max(c.moe.num_experts for c in self.configs.values())
        ks = sorted({k for k in self.base.eval.top_ks if k <= limit})
        methods: dict[str, Any] = {}
        curves: dict[str, list[tuple[int, float]]] = {}
        metric = None
        for method in self.labels:
            results, analyses, run_curves = [], [], []
            for seed in self.seeds:
                run_dir = self.run_dir(method, seed)
                res = ckpt.read_json(run_dir / "results.json")
                metric = res["metric"]
                results.append(res)
                analyses.append(ckpt.read_json(run_dir / "analysis" / "analysis.json"))
                run_curves.append(_valid_curve(run_dir / "metrics.jsonl"))
            dense = not self.configs[(method, self.seeds[0])].moe.layers

            def value(res: dict, k: int, key: str = "by_top_k", dense: bool = dense) -> float:
                if not dense and str(k) not in res[key]:
                    return float("nan")  # k above this cell's expert count
                return res[key]["1"] if dense else res[key][str(k)]

            cell = self.configs[(method, self.seeds[0])]

            methods[method] = {
                "method": self.cells[method][0],
                "num_experts": None if dense else cell.moe.num_experts,
                "d_model": cell.model.d_model,
                "dense": dense,
                "by_top_k": {str(k): _stats([value(r, k) for r in results]) for k in ks},
                "tokens_per_second": {
                    str(k): _stats([value(r, k, "tokens_per_second") for r in results]) for k in ks
                },
                "train_tokens_per_second": _stats(
                    [r["tokens_per_second"]["train"] for r in results]
                ),
                # RouterBench's AIQ of -metric over the run's k values (runs made before
                # 2026-12-06 carry no cost: NaN)
                "aiq": {
                    by: _stats([r.get("aiq", {}).get(by, float("nan")) for r in results])
                    for by in ("by_macs", "by_time")
                },
                "macs_per_token": results[0].get("cost", {}).get("macs_per_token", {}),
                "parameters": results[0]["parameters"],
                "analysis": None
                if dense
                else {
                    key: _stats([_nan_if_none(a["means"].get(key)) for a in analyses])
                    for key in (*ANALYSIS_KEYS, "dropped_fraction")
                },
                "seeds": self.seeds,
                "wall_seconds": _stats(
                    [wall.get(self.run_dir(method, s).name, float("nan")) for s in self.seeds]
                ),
            }
            curves[method] = _mean_curve(run_curves)
        best = {
            str(k): min(methods, key=lambda m: _nan_last(methods[m]["by_top_k"][str(k)]["mean"]))
            for k in ks
        }
        summary = {
            "metric": metric,
            "split": "test",
            "ks": ks,
            "methods": methods,
            "best": best,
            "base_config": self.base.to_dict(),
            "machine": machine_description(),
        }
        ckpt.write_json_atomic(self.out / "summary.json", summary)
        (self.out / "table.md").write_text(table_markdown(summary))
        (self.out / "table.csv").write_text(table_csv(summary))
        plots.sweep_plots(summary, curves, self.out)
        return summary


def _normalized_base(base: dict[str, Any]) -> dict[str, Any]:
    """A stored base config as this version writes it (keys added since, at their defaults)."""
    try:
        full = config_from_dict(base).to_dict()
    except HyperRouterError:
        return base
    full.pop("name", None)
    full.pop("description", None)
    return full


def _first_differences(have: dict, want: dict, prefix: str = "", limit: int = 3) -> str:
    diffs: list[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else k)
        elif a != b:
            diffs.append(f"{key}: {a!r} in the run vs {b!r}")

    walk(have, want, prefix)
    return "; ".join(diffs[:limit]) + ("; ..." if len(diffs) > limit else "")


def _analysis_is_current(path: Path) -> bool:
    """An analysis.json holding every statistic this version tabulates (older ones are redone)."""
    if not path.is_file():
        return False
    result = ckpt.read_json(path)
    return "note" in result or set(ANALYSIS_KEYS) <= set(result.get("means", {}))


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _check_axis(flag: str, values: list[int] | None) -> None:
    if values is None:
        return
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise HyperRouterError(f"{flag} takes positive integers, got {values}")
    if len(set(values)) != len(values):
        raise HyperRouterError(f"{flag} lists a value twice: {values}")


def grid_cells(
    base: RunConfig, methods: list[str], experts: list[int] | None, sizes: list[int] | None
) -> dict[str, tuple[str, int | None, int | None]]:
    """label -> (method, E or None, d_model or None) for every cell of the grid."""
    presets = method_presets()
    cells: dict[str, tuple[str, int | None, int | None]] = {}
    for method in methods:
        spec = presets.get(method, {})
        no_moe = "moe.layers" in spec.get("set", {}) and not spec["set"]["moe.layers"]
        e_free = no_moe and not spec.get("d_inner_from_experts")
        for d in sizes or [None]:
            for e in [None] if (experts is None or e_free) else experts:
                label = method + (f"-E{e}" if e else "") + (f"-d{d}" if d else "")
                cells[label] = (method, e, d)
    return cells


def axis_overrides(base: RunConfig, experts: int | None, d_model: int | None) -> list[str]:
    """`--set` overrides of one grid cell: the expert count and the scaled widths."""
    out: list[str] = []
    if experts is not None:
        total = experts * base.moe.granularity
        top_ks = [k for k in base.eval.top_ks if k <= total] or [1]
        t = base.train
        out += [
            f"moe.num_experts={experts}",
            f"eval.top_ks={json.dumps(top_ks)}",
            f"train.top_k_min={min(t.top_k_min, total)}",
            f"train.top_k_max={min(t.top_k_max, total)}",
        ]
    if d_model is not None:
        m, g = base.model, base.moe.granularity
        f = d_model / m.d_model
        out += [
            f"model.d_model={d_model}",
            f"model.d_inner={max(1, round(m.d_inner * f))}",
            f"model.d_head={max(1, round(m.d_head * f))}",
            f"moe.d_expert={max(g, round(base.moe.d_expert * f / g) * g)}",
        ]
        if m.d_embed is not None:
            out.append(f"model.d_embed={max(1, round(m.d_embed * f))}")
    return out


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value


def _stats(values: list[float]) -> dict[str, Any]:
    finite = [v for v in values if not math.isnan(v)]
    mean = statistics.mean(finite) if finite else float("nan")
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": mean, "std": std, "values": values}


def _valid_curve(path: Path) -> list[tuple[int, float]]:
    """Validation metric with all experts (or of the dense model) at each evaluation step."""
    points = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["split"] != "valid":
            continue
        all_experts = record.get("checkpoint") == "best_all_experts"
        dense = record.get("top_k") is None
        if all_experts or dense:
            value = next(record[key] for key in ("bpc", "bpb", "ppl") if key in record)
            points.append((record["step"], value))
    return points


def _mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(step, []).append(value)
    return [(s, statistics.mean(v)) for s, v in sorted(by_step.items())]


def _duration(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def table_markdown(summary: dict[str, Any]) -> str:
    """The comparison as a Markdown table; the best mean of each k column in bold."""
    ks, metric = summary["ks"], summary["metric"].upper()
    head = ["method", "trainable params", "total params"]
    head += [f"{metric} k={k}" for k in ks]
    head += ["AIQ (MACs)", "AIQ (time)"]
    head += ["router entropy", "load CV", "load CV k=1", "expert cos-sim", "dropped"]
    head += [f"tok/s k={k}" for k in ks] + ["train tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seeds = next(iter(summary["methods"].values()))["seeds"]
    for name, m in summary["methods"].items():
        cells = [name + (" (dense)" if m["dense"] else "")]
        cells += [f"{m['parameters']['trainable']:,}", f"{m['parameters']['total']:,}"]
        for k in ks:
            s = m["by_top_k"][str(k)]
            text = "-" if math.isnan(s["mean"]) else f"{s['mean']:.4f}"
            if len(seeds) > 1 and not math.isnan(s["mean"]):  # one seed has no spread
                text += f" ± {s['std']:.4f}"
            cells.append(f"**{text}**" if summary["best"][str(k)] == name else text)
        for by in ("by_macs", "by_time"):
            value = m.get("aiq", {}).get(by, {}).get("mean", float("nan"))
            cells.append("-" if math.isnan(value) else f"{value:.4f}")
        for key in (*ANALYSIS_KEYS, "dropped_fraction"):
            a = m["analysis"]
            value = None if a is None or key not in a else a[key]["mean"]
            cells.append("-" if value is None or math.isnan(value) else f"{value:.3f}")
        cells += [_speed(m["tokens_per_second"][str(k)]["mean"]) for k in ks]
        cells.append(f"{m['train_tokens_per_second']['mean']:,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    over = (
        f"seed {seeds[0]}"
        if len(seeds) == 1
        else f"mean ± std over seeds {', '.join(map(str, seeds))}"
    )
    lines.append(
        f"Test {metric} ({over}); best mean per "
        f"column in bold. AIQ: RouterBench's area under the non-decreasing convex hull of "
        f"-{metric} against the multiply-adds per token or the measured ms per 1,000 tokens, "
        f"over each method's own k values (higher is better). Dense models use all parameters "
        f"at every k. Router statistics on "
        f"validation tokens at the training k (mean over layers and seeds)."
    )
    return "\n".join(lines) + "\n"


def _speed(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.0f}"


def table_csv(summary: dict[str, Any]) -> str:
    ks = summary["ks"]
    out = io.StringIO()
    writer = csv.writer(out)
    header = ["method", "dense", "trainable_params", "total_params"]
    for k in ks:
        header += [f"k{k}_mean", f"k{k}_std"]
    header += ["aiq_by_macs", "aiq_by_time"]
    header += ["router_entropy", "load_cv", "load_cv_top1", "expert_similarity", "dropped"]
    header += [f"tokens_per_second_k{k}" for k in ks] + ["train_tokens_per_second", "best_at"]
    writer.writerow(header)
    for name, m in summary["methods"].items():
        row = [name, m["dense"], m["parameters"]["trainable"], m["parameters"]["total"]]
        for k in ks:
            s = m["by_top_k"][str(k)]
            row += [s["mean"], s["std"] if len(m["seeds"]) > 1 else ""]  # no spread of one seed
        row += [m.get("aiq", {}).get(by, {}).get("mean", "") for by in ("by_macs", "by_time")]
        a = m["analysis"]
        row += [
            "" if a is None or key not in a else a[key]["mean"]
            for key in (*ANALYSIS_KEYS, "dropped_fraction")
        ]
        row += [m["tokens_per_second"][str(k)]["mean"] for k in ks]
        row.append(m["train_tokens_per_second"]["mean"])
        row.append(" ".join(str(k) for k in ks if summary["best"][str(k)] == name))
        writer.writerow(row)
    return out.getvalue()


def run_compare(
    out: str | Path,
    methods: str,
    seeds: int = 3,
    base: str | None = None,
    data: str | None = None,
    overrides: list[str] | None = None,
    progress: bool | None = None,
    experts: list[int] | None = None,
    sizes: list[int] | None = None,
) -> dict[str, Any] | None:
    """Run (or continue) a sweep; the summary (None on the ranks other than 0 under torchrun)."""
    progress = sys.stderr.isatty() if progress is None else progress
    with runlock.locked(out):  # two sweeps into one folder would train and delete each other's runs
        sweep = Sweep(out, parse_methods(methods), seeds, base, data, overrides, experts, sizes)
        return sweep.run(progress=progress)
