"""`hyperrouter analyze RUN_DIR`: what the routers of a trained model do on held-out text.

Per MoE layer, on validation tokens at the training k (the schedule's final k): router entropy
(mean and histogram), expert load and its coefficient of variation (at the training k and at
k = 1, i.e. where each token's first choice goes: at k = E the former is trivially 0), expert
diversity (mean pairwise cosine similarity of expert outputs on the same tokens), and how the
routing of the other kept checkpoints differs on the very same layer inputs. Writes
analysis.json and plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hyperrouter.analysis import plots
from hyperrouter.analysis.routing import (
    coefficient_of_variation,
    entropy_per_token,
    expert_load,
    expert_similarity,
    histogram,
    routing_agreement,
)
from hyperrouter.moe import MoE
from hyperrouter.train import checkpoint as ckpt
from hyperrouter.train.evaluate import eval_mem_len, evaluate, load_matching_corpus, load_trained

ENTROPY_BINS = 20
# per-layer statistics averaged over layers into "means" (and into the compare table)
ANALYSIS_KEYS = ("entropy_mean", "load_cv", "load_cv_top1", "expert_similarity")


def _capture_inputs(layers: list[MoE], limit: int) -> tuple[list[list[Tensor]], list]:
    captured: list[list[Tensor]] = [[] for _ in layers]

    def hook(i: int):
        def pre(module, args, kwargs):
            x = args[0].detach().reshape(-1, module.d_model)
            have = sum(t.shape[0] for t in captured[i])
            if have < limit:
                captured[i].append(x[: limit - have].float().cpu())

        return pre

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(layers)]
    return captured, handles


def _router_logits(layer: MoE, x: Tensor) -> Tensor:
    router = layer.router
    with torch.no_grad():
        return router.compute_logits(x.to(next(layer.parameters()).dtype)).float()


@torch.no_grad()
def analyze_run(
    path: str | Path,
    *,
    data: str | None = None,
    max_tokens: int = 8192,
    diversity_tokens: int = 256,
    out_dir: str | Path | None = None,
    make_plots: bool = True,
) -> dict[str, Any]:
    """Analyse the best all-experts checkpoint of a run; returns (and writes) analysis.json."""
    run = load_trained(path, "best_all_experts")
    model, config = run.model, run.config
    run_dir = Path(path) if (Path(path) / "checkpoints").is_dir() else run.folder.parent.parent
    out = Path(out_dir) if out_dir is not None else run_dir / "analysis"
    layers = model.moe_layers()
    result: dict[str, Any] = {
        "checkpoint": run.folder.name,
        "router": config.moe.router if layers else None,
        "layers": [],
    }
    if not layers:
        result["note"] = "dense model: no routers to analyse"
        _write(out, result)
        return result
    corpus = load_matching_corpus(run, data)
    top_k = config.train_top_k(config.train.steps)
    device = next(model.parameters()).device
    captured, handles = _capture_inputs(layers, max_tokens)
    batches = max(1, -(-max_tokens // (config.eval.batch_size * config.eval.tgt_len)))
    try:
        evaluate(
            model,
            corpus.valid,
            batch_size=config.eval.batch_size,
            tgt_len=config.eval.tgt_len,
            mem_len=eval_mem_len(config),
            top_k=top_k,
            device=device,
            max_batches=batches,
        )
    finally:
        for h in handles:
            h.remove()
    inputs = [torch.cat(c) for c in captured]
    others = _other_checkpoints(run_dir, run.folder)
    num_experts = model.num_experts
    for index, (layer, x) in enumerate(zip(layers, inputs)):
        logits = _router_logits(layer, x.to(device)).cpu()
        entropy = entropy_per_token(logits)
        k = num_experts if layer.router.uses_all_experts else top_k
        ids = logits.topk(k, dim=-1).indices
        counts = expert_load(ids, num_experts)
        counts_top1 = expert_load(ids[:, :1], num_experts)  # where each token goes at k = 1
        sample = x[:diversity_tokens].to(device)
        layer_dtype = next(layer.parameters()).dtype
        outputs = torch.stack(
            [layer.experts.expert_forward(e, sample.to(layer_dtype)) for e in range(num_experts)]
        ).float()
        entry = {
            "layer": index,
            "tokens": int(x.shape[0]),
            "top_k": k,
            "entropy_mean": float(entropy.mean()),
            "entropy_max_possible": float(torch.log(torch.tensor(float(num_experts)))),
            "entropy_histogram": histogram(
                entropy, ENTROPY_BINS, 0.0, float(torch.log(torch.tensor(float(num_experts))))
            ),
            "tokens_per_expert": counts.tolist(),
            "load_cv": coefficient_of_variation(counts),
            "tokens_per_expert_top1": counts_top1.tolist(),
            "load_cv_top1": coefficient_of_variation(counts_top1),
            "expert_similarity": expert_similarity(outputs),
            "checkpoint_changes": {},
        }
        for name, other_layers in others.items():
            other_logits = _router_logits(other_layers[index], x.to(device)).cpu()
            entry["checkpoint_changes"][name] = routing_agreement(logits, other_logits, k)
        result["layers"].append(entry)
    result["means"] = {
        key: sum(layer[key] for layer in result["layers"]) / len(result["layers"])
        for key in ANALYSIS_KEYS
    }
    result["top_k"] = top_k
    _write(out, result)
    if make_plots:
        plots.analysis_plots(result, out)
    return result


def _other_checkpoints(run_dir: Path, main: Path) -> dict[str, list[MoE]]:
    """MoE layers of every other distinct checkpoint the run keeps (latest, best_train_k...)."""
    if not (run_dir / "checkpoints" / ckpt.INDEX).is_file():
        return {}
    out: dict[str, list[MoE]] = {}
    seen = {main.name}
    for name, folder in sorted(ckpt.read_index(run_dir).items()):
        if folder in seen:
            continue
        seen.add(folder)
        other = load_trained(run_dir / "checkpoints" / folder)
        out[f"{name} ({folder})"] = other.model.moe_layers()
    return out


def _write(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_json_atomic(out / "analysis.json", result)
