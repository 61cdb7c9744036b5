"""`hyperrouter bench model`: what a whole Transformer-XL (+ MoE) costs at every k.

For each k the model is timed in inference (one evaluation segment of eval.tgt_len tokens per
column with memory, as `hyperrouter eval` runs it, no autograd) and in training (forward,
backward and an Adam step on a training batch with memory), next to its dense twin: the same
model whose MoE FFNs are dense FFNs of hidden width k x d_expert (the same active expert compute).
Every contender is warmed up, then timed round-robin (one call each per repeat) so that machine
noise hits them alike; medians are reported with the spread (min-max) of the repeats. Beside each
time the analytic multiply-add count per token (`hyperrouter.cost`) gives the speedup the compute
predicts: k = E's count over k's. The measured speedup over k = E is set against it.

`profile_model` breaks one inference call down per operator (torch.profiler) and per part of the
model (forward hooks: attention, MoE layers, dense FFNs, softmax, the rest).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from hyperrouter.bench import timed_ms
from hyperrouter.cost import PARTS, Shape, macs_per_token
from hyperrouter.errors import HyperRouterError
from hyperrouter.models.transformer_xl import TransformerXL
from hyperrouter.train.config import RunConfig
from hyperrouter.train.evaluate import eval_mem_len

MODES = ("infer", "train")


@dataclass
class ModelBenchRecord:
    """One (model, k, mode) timing: per-batch latency (median and min-max over the repeats),
    tokens/s and the analytic multiply-adds per token by part (inference segment shape)."""

    model: str  # "moe" or "dense_twin"
    mode: str
    top_k: int
    num_experts: int
    tokens_per_batch: int
    median_ms: float
    min_ms: float
    max_ms: float
    tokens_per_second: float
    repeats: int
    macs_per_token: dict[str, float] = field(default_factory=dict)
    compiled: bool = False  # attention blocks under torch.compile (`--compile`)

    @property
    def total_macs(self) -> float:
        return sum(self.macs_per_token.values())


def dense_twin(model: TransformerXL, k: int) -> TransformerXL:
    """`model` with each MoE FFN replaced by a dense ReLU FFN of hidden width k x d_expert."""
    twin = copy.deepcopy(model)
    for layer in twin.layers:
        moe = layer.ff.moe
        if moe is None:
            continue
        width = k * moe.experts.d_hidden  # k experts of this width (fine-grained ones if split)
        d = moe.d_model
        layer.ff.moe = None
        layer.ff.core = nn.Sequential(
            nn.Linear(d, width), nn.ReLU(inplace=True), nn.Dropout(0.0), nn.Linear(width, d)
        ).to(next(model.parameters()).device)
    return twin


def _batch(n_token: int, qlen: int, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, n_token, (qlen + 1, batch), generator=gen).to(device)
    return data[:-1], data[1:]


def _memory(model: TransformerXL, data: Tensor, mlen: int) -> list[Tensor]:
    """A memory of `mlen` rows (from forwards over the same segment), fixed for every call; the
    model keeps `mlen` rows from now on, as evaluation sets it (`evaluate`)."""
    model.mem_len = mlen
    if mlen == 0:
        return []
    mems: list[Tensor] = []
    with torch.no_grad():
        for _ in range(-(-mlen // data.shape[0])):
            mems = model(data, None, mems or None).mems
    return mems


def _infer_step(model: TransformerXL, data: Tensor, target: Tensor, mems: list[Tensor]):
    model.eval()

    def step() -> None:
        with torch.inference_mode():
            model(data, target, mems or None)

    return step


def _train_step(model: TransformerXL, data: Tensor, target: Tensor, mems: list[Tensor], lr: float):
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(data, target, mems or None)
        (out.loss + out.aux_loss).backward()
        opt.step()

    return step


def run_model_bench(
    model: TransformerXL,
    config: RunConfig,
    *,
    ks: list[int] | None = None,
    modes: tuple[str, ...] = MODES,
    repeats: int = 5,
    warmup: int = 2,
    dense: bool = True,
    progress: bool = False,
    compile: bool = False,
) -> list[ModelBenchRecord]:
    """Time `model` (and its dense twin for each k) at each k in each mode; returns the records.

    `compile`: every contender is a copy whose attention blocks run under torch.compile
    (`TransformerXL.compile_attention`; eager, with a note, where this torch cannot compile)."""
    if not model.moe_layers():
        raise HyperRouterError("bench model needs a model with MoE layers (this one is dense)")
    experts = model.num_experts
    ks = sorted(set(ks or [k for k in config.eval.top_ks if k <= experts] or [experts]))
    bad = [k for k in ks if not 1 <= k <= experts]
    if bad:
        raise HyperRouterError(f"--top-k values must be in [1, {experts}], got {bad}")
    bad_modes = [m for m in modes if m not in MODES]
    if bad_modes or not modes:
        raise HyperRouterError(f"--modes takes {', '.join(MODES)}; got {','.join(modes)}")
    for name, value in (("--repeats", repeats), ("--warmup", warmup)):
        if value < (1 if name == "--repeats" else 0):
            raise HyperRouterError(f"{name} must be >= {1 if name == '--repeats' else 0}")
    device = next(model.parameters()).device
    original_k, original_mem = model.top_k, model.mem_len
    e, t = config.eval, config.train
    shapes = {
        "infer": (e.tgt_len, eval_mem_len(config), e.batch_size),
        "train": (t.tgt_len, t.mem_len, t.batch_size),
    }
    twins = {k: dense_twin(model, k) for k in ks} if dense else {}
    records: list[ModelBenchRecord] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(modes) * repeats, desc="bench model", disable=not progress, leave=False)
    for mode in modes:
        qlen, mlen, batch = shapes[mode]
        data, target = _batch(model.n_token, qlen, batch, device)
        cost_shape = Shape(e.tgt_len, eval_mem_len(config), e.batch_size)
        contenders: list[tuple[str, int, TransformerXL]] = []
        for k in ks:
            contenders.append(("moe", k, model))
            if dense:
                contenders.append(("dense_twin", k, twins[k]))
        steps = []
        compiled_copies: dict[int, TransformerXL] = {}
        for i, (name, k, m) in enumerate(contenders):
            if mode == "train":  # each contender its own copy: optimizer steps change weights
                m = copy.deepcopy(m)
            if compile:  # a compiled copy (one for all the k of the MoE model in inference)
                if id(m) not in compiled_copies:
                    twin = copy.deepcopy(m)
                    compiled = twin.compile_attention()
                    compiled_copies[id(m)] = twin
                m = compiled_copies[id(m)]
                contenders[i] = (name, k, m)
            if name == "moe":
                m.set_top_k(k)
            mems = _memory(m, data, mlen)
            if mode == "infer":  # the k values share one model: k is set before each call
                step = _with_k(_infer_step(m, data, target, mems), m if name == "moe" else None, k)
            else:
                step = _train_step(m, data, target, mems, t.lr)
            steps.append(step)
        for step in steps:
            for _ in range(warmup):
                step()
        times: list[list[float]] = [[] for _ in steps]
        for _ in range(repeats):
            for i, step in enumerate(steps):
                times[i].append(timed_ms(step, device))
            bar.update(1)
        for (name, k, m), ts in zip(contenders, times):
            if name == "moe":
                m.set_top_k(k)
            median = statistics.median(ts)
            records.append(
                ModelBenchRecord(
                    model=name,
                    mode=mode,
                    top_k=k,
                    num_experts=experts,
                    tokens_per_batch=qlen * batch,
                    median_ms=round(median, 3),
                    min_ms=round(min(ts), 3),
                    max_ms=round(max(ts), 3),
                    tokens_per_second=round(qlen * batch / (median / 1e3), 1),
                    repeats=len(ts),
                    macs_per_token=macs_per_token(m, cost_shape, k if name == "moe" else None),
                    compiled=compile and compiled,
                )
            )
    bar.close()
    model.set_top_k(original_k)
    model.mem_len = original_mem
    return records


def _with_k(step: Callable[[], None], model: TransformerXL | None, k: int) -> Callable[[], None]:
    """`step` run at k (the model is shared by the k values: k is set before each call)."""
    if model is None:
        return step

    def run() -> None:
        model.set_top_k(k)
        step()

    return run


def speedups(records: list[ModelBenchRecord]) -> list[dict]:
    """Per mode and k of the MoE model: measured speedup over k = E, the speedup the multiply-add
    count predicts, their ratio, and the MoE model's time over its dense twin's."""
    out = []
    for mode in MODES:
        moe = {r.top_k: r for r in records if r.mode == mode and r.model == "moe"}
        twin = {r.top_k: r for r in records if r.mode == mode and r.model == "dense_twin"}
        if not moe:
            continue
        full = moe.get(max(moe))
        for k, r in sorted(moe.items()):
            measured = full.median_ms / r.median_ms
            predicted = full.total_macs / r.total_macs
            out.append(
                {
                    "mode": mode,
                    "top_k": k,
                    "over_k": full.top_k,
                    "measured_speedup": round(measured, 3),
                    "predicted_speedup": round(predicted, 3),
                    "fraction_of_predicted": round(measured / predicted, 3),
                    "vs_dense_twin": round(r.median_ms / twin[k].median_ms, 3)
                    if k in twin
                    else None,
                }
            )
    return out


def format_table(records: list[ModelBenchRecord]) -> str:
    """Times, tokens/s and multiply-adds per token, then the speedups against the prediction."""
    lines = [
        f"{'mode':<6} {'k':>3}  {'model':<11} {'median ms':>10} {'min-max ms':>17} "
        f"{'tokens/s':>10} {'MACs/token':>11}"
    ]
    for r in sorted(records, key=lambda r: (MODES.index(r.mode), r.top_k, r.model)):
        spread = f"{r.min_ms:.1f}-{r.max_ms:.1f}"
        lines.append(
            f"{r.mode:<6} {r.top_k:>3}  {r.model:<11} {r.median_ms:>10.1f} {spread:>17} "
            f"{r.tokens_per_second:>10.0f} {r.total_macs:>11,.0f}"
        )
    lines.append("")
    lines.append(
        f"{'mode':<6} {'k':>3}  {'speedup over k=E':>17} {'predicted':>10} {'of predicted':>13} "
        f"{'x dense twin':>13}"
    )
    for s in speedups(records):
        twin = "-" if s["vs_dense_twin"] is None else f"{s['vs_dense_twin']:.2f}"
        lines.append(
            f"{s['mode']:<6} {s['top_k']:>3}  {s['measured_speedup']:>17.2f} "
            f"{s['predicted_speedup']:>10.2f} {s['fraction_of_predicted']:>13.2f} {twin:>13}"
        )
    parts = next((r.macs_per_token for r in records if r.model == "moe"), {})
    if parts:
        k = next(r.top_k for r in records if r.model == "moe")
        shares = ", ".join(f"{p} {parts[p]:,.0f}" for p in PARTS if parts.get(p))
        lines.append("")
        lines.append(f"multiply-adds per token at k={k} (inference segment): {shares}")
    lines.append(
        "speedup over k=E: median time at k = E over median time at k; predicted: the "
        "multiply-add count at k = E over the count at k; x dense twin: the MoE model's time "
        "over the same model with dense FFNs of width k x d_expert"
    )
    return "\n".join(lines)


def profile_model(model: TransformerXL, config: RunConfig, k: int, repeats: int = 3) -> str:
    """Where one inference call's time goes: the top operators, and the parts of the model."""
    from torch.profiler import ProfilerActivity, profile

    e = config.eval
    device = next(model.parameters()).device
    data, target = _batch(model.n_token, e.tgt_len, e.batch_size, device)
    old_k, old_mem = model.top_k, model.mem_len
    model.set_top_k(k)
    mems = _memory(model, data, eval_mem_len(config))
    step = _infer_step(model, data, target, mems)
    step()  # warm-up
    parts: dict[str, list[float]] = {}
    handles = []

    def timer(name: str, module: nn.Module) -> None:
        def pre(*_):
            module._bench_start = time.perf_counter()

        def post(*_):
            parts.setdefault(name, []).append(time.perf_counter() - module._bench_start)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    for layer in model.layers:
        timer("attention", layer.attn)
        timer("moe" if layer.ff.moe is not None else "dense_ffn", layer.ff)
    timer("softmax", model.crit)
    totals = []
    try:
        for _ in range(repeats):
            totals.append(timed_ms(step, device) / 1e3)
    finally:
        for h in handles:
            h.remove()
        model.set_top_k(old_k)
        model.mem_len = old_mem
    total = statistics.median(totals)
    lines = [f"k={k}: one inference call {total * 1e3:.1f} ms (median of {repeats})", ""]
    lines.append(f"{'part':<12} {'ms':>9} {'share':>7}")
    accounted = 0.0
    for name, values in parts.items():
        per_call = sum(values) / repeats
        accounted += per_call
        lines.append(f"{name:<12} {per_call * 1e3:>9.1f} {per_call / total:>7.1%}")
    rest = max(total - accounted, 0.0)
    lines.append(f"{'the rest':<12} {rest * 1e3:>9.1f} {rest / total:>7.1%}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    lines.append("")
    lines.append(prof.key_averages().table(sort_by=key, row_limit=15))
    return "\n".join(lines)


def write_json(records: list[ModelBenchRecord], path: str | Path) -> None:
    from hyperrouter.train.checkpoint import write_json_atomic

    data = {
        "records": [asdict(r) | {"total_macs": r.total_macs} for r in records],
        "speedups": speedups(records),
    }
    write_json_atomic(Path(path), data)
