"""`hyperrouter analyze RUN_DIR`: what the routers of a trained model do on held-out text.

Per MoE layer, on validation tokens at the training k (the schedule's final k), from the routing
the layer really did (its `MoEOutput`: router drops, capacity drops and all): router entropy
(mean and histogram; absent for routers without logits), expert load and its coefficient of
variation (of the kept assignments, and of each token's first choice, i.e. its highest-weight
slot: at k = E the former is trivially 0), the dropped fraction, the off-node share (kept pairs
whose expert sits on another virtual node than the token, experts placed contiguously over
`nodes` nodes, a token's node = its sequence mod nodes: what expert parallelism would move),
the router's own diagnostics (`Routing.stats`), expert diversity (mean pairwise cosine
similarity of expert outputs on the same tokens), and how the routing of the other kept
checkpoints differs when their routers route the very same layer inputs. Writes analysis.json
and plots.
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
    first_choice,
    histogram,
    off_node_fraction,
    routing_agreement,
)
from hyperrouter.errors import HyperRouterError
from hyperrouter.moe import MoE, MoEOutput
from hyperrouter.routers import Routing, RoutingContext
from hyperrouter.train import checkpoint as ckpt
from hyperrouter.train.evaluate import eval_mem_len, evaluate, load_matching_corpus, load_trained

ENTROPY_BINS = 20
# per-layer statistics averaged over layers into "means" (and into the compare table)
ANALYSIS_KEYS = ("entropy_mean", "load_cv", "load_cv_top1", "expert_similarity")


class _Captured:
    """Per layer: the routed inputs and the routing the layer did on them (up to `limit` tokens)."""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []
        self.ids: list[Tensor] = []
        self.weights: list[Tensor] = []
        self.keep: list[Tensor] = []
        self.logits: list[Tensor] = []
        self.token_ids: list[Tensor] = []
        self.sequence_ids: list[Tensor] = []
        self.router_stats: dict[str, list[float]] = {}
        self.tokens = 0

    def ids_of(self, name: str) -> Tensor | None:
        parts = getattr(self, name)
        return torch.cat(parts) if parts and len(parts) == len(self.inputs) else None

    def routing(self) -> Routing:
        """The captured batches as one Routing; routers whose slot count varies by batch (expert
        choice) are padded with dropped slots."""
        slots = max(t.shape[1] for t in self.ids)

        def pad(parts: list[Tensor], value: float | bool) -> Tensor:
            return torch.cat(
                [torch.nn.functional.pad(t, (0, slots - t.shape[1]), value=value) for t in parts]
            )

        logits = torch.cat(self.logits) if self.logits else None
        return Routing(pad(self.ids, 0), pad(self.weights, 0.0), logits, keep=pad(self.keep, False))


def _capture(layers: list[MoE], limit: int) -> tuple[list[_Captured], list]:
    captured = [_Captured() for _ in layers]

    def hook(i: int):
        def post(module: MoE, args, kwargs, output) -> None:
            if not isinstance(output, MoEOutput) or output.routing is None:
                return
            c = captured[i]
            take = limit - c.tokens
            if take <= 0:
                return
            x = args[0].detach().reshape(-1, module.d_model)
            mask = kwargs.get("mask")
            if mask is not None:
                x = x[mask.reshape(-1)]
            r = output.routing
            keep = r.keep if r.keep is not None else torch.ones_like(r.expert_ids, dtype=torch.bool)
            c.inputs.append(x[:take].float().cpu())
            c.ids.append(r.expert_ids[:take].cpu())
            c.weights.append(r.weights[:take].detach().float().cpu())
            c.keep.append(keep[:take].cpu())
            if r.logits is not None:
                c.logits.append(r.logits[:take].detach().float().cpu())
            for name, value in r.stats.items():
                c.router_stats.setdefault(name, []).append(float(value))
            for name in ("token_ids", "sequence_ids"):
                ids = kwargs.get(name)
                if ids is not None:
                    ids = ids.reshape(-1) if mask is None else ids[mask]
                    getattr(c, name).append(ids[:take].cpu())
            c.tokens += min(take, x.shape[0])

        return post

    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(layers)]
    return captured, handles


def _route(layer: MoE, x: Tensor, top_k: int, cap: _Captured) -> Routing:
    """How `layer`'s router routes x in eval (with the layer's own capacity limit, if any), with
    the token and sequence ids the model gave with those inputs."""
    dtype = next(layer.parameters()).dtype
    k = layer.num_experts if layer.router.uses_all_experts else top_k
    device = x.device
    token_ids, sequence_ids = cap.ids_of("token_ids"), cap.ids_of("sequence_ids")
    token_ids = None if token_ids is None else token_ids.to(device)
    sequence_ids = None if sequence_ids is None else sequence_ids.to(device)
    if layer.capacity_factor is not None:
        routing = layer(
            x.to(dtype),
            top_k=k,
            return_details=True,
            token_ids=token_ids,
            sequence_ids=sequence_ids,
        ).routing
    else:
        ctx = RoutingContext(
            top_k=k, training=False, token_ids=token_ids, sequence_ids=sequence_ids
        )
        routing = layer.router(x.to(dtype), ctx)
    keep = routing.keep
    if keep is None:
        keep = torch.ones_like(routing.expert_ids, dtype=torch.bool)
    return Routing(routing.expert_ids.cpu(), routing.weights.float().cpu(), None, keep=keep.cpu())


@torch.no_grad()
def analyze_run(
    path: str | Path,
    *,
    data: str | None = None,
    max_tokens: int = 8192,
    diversity_tokens: int = 256,
    out_dir: str | Path | None = None,
    make_plots: bool = True,
    nodes: int = 2,
    top_k: int | None = None,
) -> dict[str, Any]:
    """Analyse the best all-experts checkpoint of a run; returns (and writes) analysis.json."""
    run = load_trained(path, "best_all_experts")
    model, config = run.model, run.config
    run_dir = ckpt.run_folder(path)
    out = analysis_dir(path, out_dir)
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
    if top_k is None:  # the training k (the schedule's final k)
        top_k = config.final_top_k()
    elif not 1 <= top_k <= model.num_experts:
        raise HyperRouterError(f"--top-k must be in [1, {model.num_experts}], got {top_k}")
    device = next(model.parameters()).device
    captured, handles = _capture(layers, max_tokens)
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
    others = _other_checkpoints(run_dir, run.folder)
    num_experts = model.num_experts
    for index, (layer, cap) in enumerate(zip(layers, captured)):
        x = torch.cat(cap.inputs)
        routing = cap.routing()
        k = routing.expert_ids.shape[1]
        counts = expert_load(routing.expert_ids[routing.keep], num_experts)
        counts_top1 = expert_load(first_choice(routing), num_experts)
        wanted = x.shape[0] * (num_experts if layer.router.uses_all_experts else top_k)
        kept = int(routing.keep.sum())
        dropped = max(0.0, 1.0 - kept / wanted) if wanted else 0.0  # as RoutingStats counts it
        sample = x[:diversity_tokens].to(device)
        layer_dtype = next(layer.parameters()).dtype
        outputs = torch.stack(
            [  # the FFN experts (MoE++'s zero-computation experts have no FFN to compare)
                layer.experts.expert_forward(e, sample.to(layer_dtype))
                for e in range(layer.ffn_experts)
            ]
        ).float()
        max_entropy = float(torch.log(torch.tensor(float(num_experts))))
        entry = {
            "layer": index,
            "tokens": int(x.shape[0]),
            "top_k": k,
            "entropy_mean": None,
            "entropy_max_possible": max_entropy,
            "entropy_histogram": None,
            "dropped_fraction": dropped,
            "tokens_per_expert": counts.tolist(),
            "load_cv": coefficient_of_variation(counts),
            "tokens_per_expert_top1": counts_top1.tolist(),
            "load_cv_top1": coefficient_of_variation(counts_top1),
            "expert_similarity": expert_similarity(outputs),
            "checkpoint_changes": {},
        }
        if routing.logits is not None:
            entropy = entropy_per_token(routing.logits)
            entry["entropy_mean"] = float(entropy.mean())
            entry["entropy_histogram"] = histogram(entropy, ENTROPY_BINS, 0.0, max_entropy)
        entry["off_node_fraction"] = off_node_fraction(
            routing, cap.ids_of("sequence_ids"), num_experts, nodes
        )
        if cap.router_stats:  # the router's own diagnostics, averaged over the captured calls
            entry["router_stats"] = {n: sum(v) / len(v) for n, v in cap.router_stats.items()}
        here = _route(layer, x.to(device), top_k, cap)
        for name, other_layers in others.items():
            there = _route(other_layers[index], x.to(device), top_k, cap)
            entry["checkpoint_changes"][name] = routing_agreement(here, there, num_experts)
        result["layers"].append(entry)
    result["means"] = {}
    result["nodes"] = nodes
    for key in (*ANALYSIS_KEYS, "dropped_fraction", "off_node_fraction"):
        values = [layer[key] for layer in result["layers"] if layer[key] is not None]
        result["means"][key] = sum(values) / len(values) if values else None
    result["top_k"] = top_k
    _write(out, result)
    if make_plots:
        plots.analysis_plots(result, out)
    return result


def analysis_dir(path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Where `analyze_run` writes: `out_dir`, or RUN_DIR/analysis."""
    if out_dir is not None:
        return Path(out_dir)
    return ckpt.run_folder(path) / "analysis"


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
