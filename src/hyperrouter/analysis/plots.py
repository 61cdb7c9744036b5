"""PNG plots (matplotlib, optional: without it plots are skipped with a note)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "note: matplotlib is not installed, no plots (pip install hyperrouter[plot])",
            file=sys.stderr,
        )
        return None
    return plt


def analysis_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """Router entropy histograms and expert load per MoE layer."""
    plt = _pyplot()
    if plt is None or not result["layers"]:
        return []
    layers = result["layers"]
    fig, axes = plt.subplots(2, len(layers), figsize=(3.2 * len(layers), 5.5), squeeze=False)
    for col, layer in enumerate(layers):
        hist = layer["entropy_histogram"]
        if hist is None:  # a router without scores (e.g. hash): no entropy to show
            axes[0][col].text(0.5, 0.5, "no router scores", ha="center", va="center")
            axes[0][col].set_title(f"layer {layer['layer']}")
            axes[0][col].set_axis_off()
        else:
            edges = hist["edges"]
            widths = [b - a for a, b in zip(edges, edges[1:])]
            axes[0][col].bar(
                edges[:-1], hist["counts"], width=widths, align="edge", color="#4477aa"
            )
            axes[0][col].set_title(f"layer {layer['layer']}: H={layer['entropy_mean']:.2f}")
            axes[0][col].set_xlabel("router entropy (nats)")
        # each token's first choice: at the training k the load is trivially flat when k = E
        counts = layer["tokens_per_expert_top1"]
        axes[1][col].bar(range(len(counts)), counts, color="#cc6677")
        axes[1][col].set_title(f"first-choice load CV {layer['load_cv_top1']:.2f}")
        axes[1][col].set_xlabel("expert")
    axes[0][0].set_ylabel("tokens")
    axes[1][0].set_ylabel("tokens (top-1 expert)")
    fig.tight_layout()
    path = out / "routing.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def sweep_plots(
    summary: dict[str, Any], curves: dict[str, list[tuple[int, float]]], out: Path
) -> list[Path]:
    """Quality vs active experts, vs inference speed, vs multiply-adds with each method's AIQ hull
    (runs that report their cost), and the validation curves."""
    plt = _pyplot()
    if plt is None:
        return []
    metric = summary["metric"].upper()
    paths = []
    methods = summary["methods"]

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {name: colors[i % len(colors)] for i, name in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, m in methods.items():
        ks = [int(k) for k in m["by_top_k"]]
        means = [m["by_top_k"][k]["mean"] for k in m["by_top_k"]]
        stds = [m["by_top_k"][k]["std"] for k in m["by_top_k"]]
        if m["dense"]:
            ax.axhline(
                means[0], linestyle="--", linewidth=1, label=f"{name} (dense)", color=color[name]
            )
        else:
            ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=name, color=color[name])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts used per token at inference (k)")
    ax.set_ylabel(f"test {metric} (lower is better)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "quality_vs_k.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, m in methods.items():
        xs = [m["tokens_per_second"][k]["mean"] for k in m["by_top_k"]]
        ys = [m["by_top_k"][k]["mean"] for k in m["by_top_k"]]
        ax.plot(xs, ys, marker="o", label=name, color=color[name])
        if not m["dense"]:
            for k, x, y in zip(m["by_top_k"], xs, ys):
                ax.annotate(f"k={k}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("inference tokens / second (measured)")
    ax.set_ylabel(f"test {metric}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "quality_vs_speed.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if any(m.get("macs_per_token") for m in methods.values()):
        from hyperrouter.analysis.aiq import nondecreasing_hull

        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for name, m in methods.items():
            macs = m.get("macs_per_token") or {}
            pts = [(macs[k], -m["by_top_k"][k]["mean"]) for k in m["by_top_k"] if k in macs]
            pts = [(x, y) for x, y in pts if y == y]  # no NaN
            if not pts:
                continue
            xs, ys = zip(*pts)
            score = m.get("aiq", {}).get("by_macs", {}).get("mean", float("nan"))
            ax.plot(xs, ys, "o", color=color[name], label=f"{name} (AIQ {score:.3f})")
            hx, hy = zip(*nondecreasing_hull(pts))
            ax.plot(hx, hy, "--", color=color[name], linewidth=1)
        ax.set_xlabel("multiply-adds per token (analytic)")
        ax.set_ylabel(f"-test {metric} (higher is better)")
        ax.set_title("quality vs cost at every k, with each method's non-decreasing hull")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / "quality_vs_cost.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, points in curves.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker=".", label=name, color=color.get(name))
    ax.set_xlabel("training step")
    ax.set_ylabel(f"validation {metric} (all experts; mean over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "valid_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def plot_adaptive(result: dict[str, Any], path: Path) -> bool:
    """`hyperrouter adaptive`: the metric against multiply-adds per token and against measured
    time, static k and every policy, each with its non-decreasing convex hull (dashed)."""
    from hyperrouter.analysis.aiq import nondecreasing_hull

    plt = _pyplot()
    if plt is None:
        return False
    metric = result["metric"]
    curves = {"static k": result["static"], **result.get("policies", {})}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "macs_per_token", "multiply-adds per token"),
        (axes[1], "ms_per_1000_tokens", "ms per 1,000 tokens (measured)"),
    ):
        for i, (name, rows) in enumerate(curves.items()):
            color = f"C{i}"
            xs = [r[key] for r in rows]
            ys = [r["value"] for r in rows]
            ax.plot(xs, ys, "o", color=color, label=name, ms=4)
            hx, hy = zip(*nondecreasing_hull((x, -y) for x, y in zip(xs, ys)))
            ax.plot(hx, [-y for y in hy], "--", color=color, lw=1)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} (lower is better)")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    axes[0].legend(fontsize=8)
    fig.suptitle("quality against cost: static k and the adaptive policies")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
