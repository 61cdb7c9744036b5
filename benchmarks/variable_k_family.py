"""Quality against real cost for the routers that spend fewer experts (issue 26's table).

    python benchmarks/variable_k_family.py --run NAME=RUN_DIR [--run ...] \
        [--group NAME=MEMBER,MEMBER,...] [--sweep-p NAME=P,P,...] [--reuse-p FAMILY_JSON] \
        [--range-from NAME] --out DIR

Each `--run` is a trained run folder (`hyperrouter compare` makes them), evaluated on test at
every k of its results.json. For every (run, k) the table gives test BPC, the FFN experts each
token computed (the evaluation's measured mean over MoE layers; k itself for runs evaluated
before it was measured, whose routers all compute k), the multiply-adds per token recomputed
with the current cost model (`hyperrouter.cost`, charged by the measured mean k), and the
milliseconds per 1,000 tokens the evaluation measured (as noisy as the machine was then).

A method's sweep is its points over k, or over what the issue names for it: `--sweep-p NAME=...`
re-evaluates a `top_p` router's run on test at its training k with the router's threshold p set
to each value (so the top-p sweep is over p); `--group NAME=A,B,C` pools other runs' points into
one sweep (ReMoE over its target sparsity: one run per target). AIQ (RouterBench, higher is
better, quality = -BPC; `hyperrouter.analysis.aiq`) is computed over one common cost range for
every method: the multiply-adds of the `--range-from` method's k = min and k = max points (the
static-k curve of HyperRouter by default), so the numbers compare on one footing.

Writes DIR/family.json, DIR/family.md and, with matplotlib, DIR/family.png (BPC against FFN
experts per token and against multiply-adds). Run it alone on the machine if the times matter.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from hyperrouter.analysis.aiq import aiq
from hyperrouter.cost import Shape, macs_per_token
from hyperrouter.train.checkpoint import write_json_atomic
from hyperrouter.train.evaluate import (
    eval_mem_len,
    evaluate,
    load_matching_corpus,
    load_trained,
    metric_value,
)


def pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{flag} needs NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def run_points(name: str, folder: Path) -> list[dict]:
    """The run's test points (one per evaluated k), with multiply-adds from the cost model."""
    results = json.loads((folder / "results.json").read_text())
    run = load_trained(folder, device=torch.device("cpu"))
    cfg = run.config
    shape = Shape(cfg.eval.tgt_len, eval_mem_len(cfg), cfg.eval.batch_size)
    measured = results.get("mean_k", {})
    ms = results.get("cost", {}).get("ms_per_1000_tokens", {})
    points = []
    for k, bpc in sorted(results["by_top_k"].items(), key=lambda kv: int(kv[0])):
        per_layer = measured.get(k) or [float(k)] * len(run.model.moe_layers())
        macs = sum(macs_per_token(run.model, shape, per_layer).values())
        points.append(
            {
                "method": name,
                "run": str(folder),
                "k": int(k),
                "bpc": bpc,
                "mean_k": round(sum(per_layer) / len(per_layer), 4),
                "macs_per_token": round(macs, 1),
                "ms_per_1000_tokens": ms.get(k),
            }
        )
    return points


def sweep_p(name: str, folder: Path, ps: list[float]) -> list[dict]:
    """A top_p router's run on test at its training k, with the threshold p set to each value."""
    run = load_trained(folder, device=torch.device("cpu"))
    model, cfg = run.model, run.config
    layers = model.moe_layers()
    if not layers or layers[0].router_name != "top_p":
        raise SystemExit(f"--sweep-p {name}: {folder} is not a top_p router's run")
    corpus = load_matching_corpus(run, None)
    shape = Shape(cfg.eval.tgt_len, eval_mem_len(cfg), cfg.eval.batch_size)
    k = cfg.final_top_k()
    points = []
    for p in ps:
        for layer in layers:  # the router's threshold and the keep rule built from it
            layer.router.p = p
            layer.router.policy = type(layer.router.policy)(p=p)
        start = time.perf_counter()
        result = evaluate(
            model,
            corpus.test,
            batch_size=cfg.eval.batch_size,
            tgt_len=cfg.eval.tgt_len,
            mem_len=eval_mem_len(cfg),
            top_k=k,
            device=torch.device("cpu"),
        )
        seconds = time.perf_counter() - start
        macs = sum(macs_per_token(model, shape, result.mean_k).values())
        points.append(
            {
                "method": name,
                "run": str(folder),
                "k": k,
                "p": p,
                "bpc": metric_value(result.loss, run.kind),
                "mean_k": round(sum(result.mean_k) / len(result.mean_k), 4),
                "macs_per_token": round(macs, 1),
                "ms_per_1000_tokens": round(1e6 * seconds / result.tokens, 4),
            }
        )
        print(f"{name} p={p:g}: {points[-1]['bpc']:.4f} bpc at {points[-1]['mean_k']:.2f} experts")
    return points


def aiq_of(points: list[dict], key: str, lo: float, hi: float) -> float | None:
    pts = [(p[key], -p["bpc"]) for p in points if p.get(key) is not None]
    pts = [(c, q) for c, q in pts if math.isfinite(c) and math.isfinite(q)]
    return round(aiq(pts, lo, hi), 4) if pts else None


def _mean_sd(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return [round(mean, 4), round(var**0.5, 4)]


def table(summary: dict) -> str:
    lines = [
        "| method | sweep | points (k or p: BPC @ experts/token) | best BPC | AIQ by MACs "
        "| seeds |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in sorted(
        summary["methods"].items(), key=lambda kv: -(kv[1]["aiq_by_macs"] or -99)
    ):
        pts = ", ".join(
            f"{'p=' + format(p['p'], 'g') if 'p' in p else 'k=' + str(p['k'])}: "
            f"{p['bpc']:.3f} @ {p['mean_k']:.2f}"
            for p in m["sweep"]
        )
        best = min(p["bpc"] for p in m["sweep"])
        seeds = m.get("seeds")
        spread = ""
        if seeds:
            (a, a_sd), (b, b_sd) = seeds["aiq_mean_sd"], seeds["best_bpc_mean_sd"]
            spread = (
                f"{len(seeds['runs'])}: best {b:.3f} ± {b_sd:.3f}, AIQ over k {a:.3f} ± {a_sd:.3f}"
            )
        row = f"| `{name}` | {m['over']} | {pts} | {best:.3f} | {m['aiq_by_macs']:.3f} | {spread} |"
        lines.append(row)
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.cm.tab20.colors  # 20 distinct colours, and a second line style beyond them
    for i, (name, m) in enumerate(sorted(summary["methods"].items())):
        pts = sorted(m["sweep"], key=lambda p: p["macs_per_token"])
        style = {"color": colors[i % 20], "linestyle": "-" if i < 20 else "--"}
        for ax, key in zip(axes, ("mean_k", "macs_per_token")):
            ax.plot([p[key] for p in pts], [p["bpc"] for p in pts], "o", ms=3, label=name, **style)
    axes[0].set_xlabel("FFN experts per token (measured)")
    axes[1].set_xlabel("multiply-adds per token")
    for ax in axes:
        ax.set_ylabel("test BPC")
        ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR (repeat)")
    parser.add_argument("--group", action="append", default=[], help="NAME=MEMBER,MEMBER")
    parser.add_argument("--sweep-p", action="append", default=[], help="NAME=P,P,...")
    parser.add_argument(
        "--reuse-p", default=None, help="a family.json whose p sweeps to reuse (not re-evaluated)"
    )
    parser.add_argument("--range-from", default="hyperrouter")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    seeds = {name: [Path(p) for p in v.split(",")] for name, v in pairs(args.run, "--run").items()}
    runs = {name: folders[0] for name, folders in seeds.items()}
    groups = {n: v.split(",") for n, v in pairs(args.group, "--group").items()}
    sweeps = {
        n: [float(x) for x in v.split(",")] for n, v in pairs(args.sweep_p, "--sweep-p").items()
    }
    points = {name: run_points(name, folder) for name, folder in runs.items()}
    p_points = {name: sweep_p(name, runs[name], ps) for name, ps in sweeps.items()}
    if args.reuse_p:
        for name, m in json.loads(Path(args.reuse_p).read_text())["methods"].items():
            if m["over"] == "p" and name in runs and name not in p_points:
                p_points[name] = m["sweep"]
    base = points[args.range_from]
    lo = min(p["macs_per_token"] for p in base)
    hi = max(p["macs_per_token"] for p in base)
    grouped = {m for members in groups.values() for m in members}
    methods = {}
    for name in runs:
        if name in grouped:
            continue
        if name in p_points:
            sweep, over = p_points[name], "p"
        else:
            sweep, over = points[name], "k"
        methods[name] = {"over": over, "sweep": sweep}
    for name, members in groups.items():
        sweep = [p for m in members for p in points[m] if p["k"] == max(q["k"] for q in points[m])]
        methods[name] = {"over": "runs: " + ", ".join(members), "sweep": sweep}
    for m in methods.values():
        m["aiq_by_macs"] = aiq_of(m["sweep"], "macs_per_token", lo, hi)
    for name, folders in seeds.items():  # more seeds: AIQ and best BPC of each (sweep over k)
        if len(folders) > 1 and name in methods:
            per_seed = [points[name]] + [run_points(name, f) for f in folders[1:]]
            aiqs = [aiq_of(pts, "macs_per_token", lo, hi) for pts in per_seed]
            bests = [min(p["bpc"] for p in pts) for pts in per_seed]
            methods[name]["seeds"] = {
                "runs": [str(f) for f in folders],
                "aiq_by_macs_over_k": aiqs,
                "best_bpc": bests,
                "aiq_mean_sd": _mean_sd(aiqs),
                "best_bpc_mean_sd": _mean_sd(bests),
            }
    summary = {
        "cost_range_macs": [lo, hi],
        "range_from": args.range_from,
        "methods": methods,
        "points": points,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "family.json", summary)
    (out / "family.md").write_text(table(summary) + "\n")
    plot(summary, out / "family.png")
    print(table(summary))


if __name__ == "__main__":
    main()
