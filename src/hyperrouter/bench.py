"""`hyperrouter bench layer`: time the MoE layer against its dense floor and peer implementations.

For each k the MoE layer (E experts of width d_hidden) is timed next to a dense FFN of hidden
width k * d_hidden: the same active compute, so the floor a sparse layer can at best reach. Two
groups compare like with like: ReLU experts with biases (the Transformer-XL / HyperRouter expert)
against a ReLU floor, and SwiGLU experts without biases against a SwiGLU floor and HuggingFace
transformers' Mixtral sparse block (eager and grouped_mm experts) with copied weights,
whose outputs are checked against ours. All implementations of one (k, mode) are timed round-robin
so that machine noise hits them alike; we report medians.

Our layer is `hyperrouter.MoE`, labelled `ours` in the records (`ours:<backend>` for a forced expert
backend), with the router(s) of `routers` (default the trainable linear `smoe`, the only router
whose gate a Mixtral block can share; each record names its router). Several routers are timed
round-robin against one floor, so each one's ratio to the floor shows what its routing costs.
Every router call gets synthetic token ids (seeded, in [0, 256)) for routers that route by token
id (`hash`); the others ignore them. Train mode runs the layer in training mode (forward +
backward, e.g. Sinkhorn for `sbase`), inference mode in eval mode. Forced expert backends are
timed with the first router only (they time the experts, which no router changes); the Mixtral
peers only next to `smoe`. A router that uses every expert (`dense`) computes all E experts
whatever k says: its ratio is against the floor of width k * d_hidden all the same.

Routers whose tokens keep a varying number of experts (top_p, remoe, adamoe, tc_moe: k is their
k_max) compute fewer pairs than k. Every record of our layer carries the measured mean number of
experts per token (`extra["mean_k"]`, the pairs computed over the tokens, in eval mode on the
timed input), and, when `smoe` is timed in the same run, `extra["x_smoe_same_pairs"]`: its time
over smoe's at the same number of kept pairs (smoe's median times interpolated linearly in k
between the timed k values; clamped at the ends), the cost of its routing at matched compute.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hyperrouter.errors import HyperRouterError
from hyperrouter.moe import MoE
from hyperrouter.train.config import check_top_ks

DEFAULT_KS = (1, 2, 4, 8, 16)
# batched_mm is left out: it gathers one weight matrix per (token, slot) pair, 17 GB at 8192
# tokens x k=2 with these sizes (it is meant for decoding a few tokens).
HF_EXPERT_IMPLEMENTATIONS = ("eager", "grouped_mm")


@dataclass
class BenchRecord:
    """One timed (implementation, k, mode): the fields of `--json` output."""

    impl: str
    device: str
    dtype: str
    num_experts: int
    top_k: int
    tokens: int
    d_model: int
    d_hidden: int
    mode: str
    median_ms: float
    ratio_vs_dense: float | None = None
    expert: str = "relu"
    repeats: int = 0
    max_rel_diff_vs_ours: float | None = None
    router: str | None = None
    extra: dict = field(default_factory=dict)


class SwiGLUFFN(nn.Module):
    """Dense SwiGLU FFN without biases: the floor for SwiGLU experts."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def dense_floor(expert: str, d_model: int, d_hidden: int) -> nn.Module:
    if expert == "swiglu":
        return SwiGLUFFN(d_model, d_hidden)
    return nn.Sequential(nn.Linear(d_model, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_model))


def hf_mixtral_block(layer: MoE, top_k: int, implementation: str) -> nn.Module | None:
    """A transformers Mixtral sparse block holding `layer`'s weights, or None if unavailable."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    experts = layer.experts
    config = MixtralConfig(
        hidden_size=experts.d_model,
        intermediate_size=experts.d_hidden,
        num_local_experts=experts.num_experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
    )
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.gate.weight)
        block.experts.gate_up_proj.copy_(experts.w_in.transpose(1, 2))
        block.experts.down_proj.copy_(experts.w_out.transpose(1, 2))
    return block


@dataclass
class _Contender:
    impl: str
    expert: str
    module: nn.Module
    call: Callable[[Tensor], Tensor]
    router: str | None = None
    token_ids: Tensor | None = None


def _contenders(
    expert: str,
    top_k: int,
    num_experts: int,
    d_model: int,
    d_hidden: int,
    backends: tuple[str, ...],
    peers: bool,
    routers: tuple[str, ...] = ("smoe",),
    token_ids: Tensor | None = None,
) -> list[_Contender]:
    floor = dense_floor(expert, d_model, top_k * d_hidden)
    out = [_Contender("dense", expert, floor, floor)]
    for i, router in enumerate(routers):
        torch.manual_seed(0)
        if expert == "swiglu":
            layer = MoE(
                d_model,
                num_experts,
                d_hidden,
                top_k,
                router=router,
                router_options={"bias": False} if router == "smoe" else {},
                activation="swiglu",
                bias=False,
            )
        else:
            layer = MoE(d_model, num_experts, d_hidden, top_k, router=router)

        def call(x: Tensor, layer: MoE = layer, backend: str | None = None) -> Tensor:
            return layer(x, backend=backend, token_ids=token_ids)

        out.append(_Contender("ours", expert, layer, call, router))
        out[-1].token_ids = token_ids
        for backend in backends if i == 0 else ():
            out.append(
                _Contender(
                    f"ours:{backend}", expert, layer, lambda x, b=backend, f=call: f(x, backend=b)
                )
            )
            out[-1].router = router
        if peers and expert == "swiglu" and router == "smoe":
            for implementation in HF_EXPERT_IMPLEMENTATIONS:
                block = hf_mixtral_block(layer, top_k, implementation)
                if block is not None:
                    call_hf = (lambda b: lambda x: b(x.unsqueeze(0)).squeeze(0))(block)
                    out.append(
                        _Contender(f"peer:hf-mixtral-{implementation}", expert, block, call_hf)
                    )
                    out[-1].router = router
    return out


def timed_ms(fn: Callable[[], None], device: torch.device) -> float:
    """Wall time of one call of `fn` in milliseconds (CUDA work finished on both sides)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _step(contender: _Contender, x: Tensor, grad: Tensor, mode: str) -> Callable[[], None]:
    params = list(contender.module.parameters())

    def train() -> None:
        for p in params:
            p.grad = None
        inp = x.detach().requires_grad_(True)
        contender.call(inp).backward(grad)

    def infer() -> None:
        with torch.inference_mode():
            contender.call(x)

    return train if mode == "train" else infer


def run_layer_bench(
    *,
    quick: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    ks: tuple[int, ...] = DEFAULT_KS,
    num_experts: int = 16,
    d_model: int = 256,
    d_hidden: int = 512,
    tokens: int | None = None,
    repeats: int | None = None,
    experts: tuple[str, ...] = ("relu", "swiglu"),
    modes: tuple[str, ...] = ("train", "infer"),
    peers: bool = True,
    progress: bool = True,
    routers: tuple[str, ...] = ("smoe",),
) -> list[BenchRecord]:
    """Time every contender for every k and mode; returns one record per (impl, router, k, mode).

    `routers`: registered router names whose MoE layers are timed side by side (default smoe)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = (
        getattr(torch, dtype)
        if dtype
        else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    )
    check_top_ks(ks, num_experts, "--top-k values")
    _check_routers(routers)
    for name, value in (("--tokens", tokens), ("--repeats", repeats)):
        if value is not None and value < 1:
            raise HyperRouterError(f"{name} must be >= 1, got {value}")
    tokens = tokens or (2048 if quick else 8192)
    repeats = repeats or (3 if quick else 7)
    backends = () if quick else ("grouped", "dense", "reference")
    jobs = [(e, k, m) for e in experts for k in ks for m in modes]
    bar = _progress(len(jobs), progress)
    records: list[BenchRecord] = []
    for expert, k, mode in jobs:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(tokens, d_model, generator=gen).to(device=dev, dtype=dt)
        grad = torch.randn(tokens, d_model, generator=gen).to(device=dev, dtype=dt)
        ids = torch.randint(0, 256, (tokens,), generator=gen).to(dev)
        contenders = [
            c
            for c in _contenders(
                expert, k, num_experts, d_model, d_hidden, backends, peers, routers, ids
            )
            if _worth_timing(c.impl, k, num_experts)
        ]
        for c in contenders:
            c.module.to(device=dev, dtype=dt)
            c.module.eval()
        diffs = _check_against_ours(contenders, x)
        mean_k = _mean_k(contenders, x)
        for c in contenders:
            c.module.train(mode == "train")
        steps = [_step(c, x, grad, mode) for c in contenders]
        for step in steps:
            step()  # warm-up (allocations, lazy initialisation)
        times: list[list[float]] = [[] for _ in contenders]
        for _ in range(repeats):
            for i, step in enumerate(steps):
                times[i].append(timed_ms(step, dev))
        floor_ms = statistics.median(times[0])
        for c, ts in zip(contenders, times):
            median = statistics.median(ts)
            records.append(
                BenchRecord(
                    impl=c.impl,
                    device=dev.type,
                    dtype=str(dt).removeprefix("torch."),
                    num_experts=num_experts,
                    top_k=k,
                    tokens=tokens,
                    d_model=d_model,
                    d_hidden=d_hidden,
                    mode=mode,
                    median_ms=round(median, 3),
                    ratio_vs_dense=round(median / floor_ms, 3),
                    expert=expert,
                    repeats=len(ts),
                    max_rel_diff_vs_ours=diffs.get((c.impl, c.router)),
                    router=c.router,
                    extra={"mean_k": mean_k[c.router]} if c.impl == "ours" else {},
                )
            )
        bar.update(1)
    bar.close()
    _matched_pairs(records)
    return records


@torch.no_grad()
def _mean_k(contenders: list[_Contender], x: Tensor) -> dict[str | None, float]:
    """Per router: the experts each token computed in an eval call on `x` (pairs / tokens)."""
    out: dict[str | None, float] = {}
    for c in contenders:
        if c.impl == "ours":
            c.module.eval()
            stats = c.module(x, return_details=True, token_ids=c.token_ids).stats
            out[c.router] = round(stats.mean_k.item(), 3)
    return out


def _matched_pairs(records: list[BenchRecord]) -> None:
    """Each of our records' time over smoe's at the same mean kept pairs (same expert, mode)."""
    for r in records:
        if r.impl != "ours" or "mean_k" not in r.extra:
            continue
        curve = sorted(
            (s.extra["mean_k"], s.median_ms)
            for s in records
            if s.impl == "ours"
            and s.router == "smoe"
            and (s.expert, s.mode) == (r.expert, r.mode)
            and "mean_k" in s.extra
        )
        if not curve:
            continue
        r.extra["x_smoe_same_pairs"] = round(
            r.median_ms / _interpolate(curve, r.extra["mean_k"]), 3
        )


def _interpolate(curve: list[tuple[float, float]], k: float) -> float:
    """The curve's value at k, linear between its points and flat beyond its ends."""
    if k <= curve[0][0]:
        return curve[0][1]
    for (k0, t0), (k1, t1) in zip(curve, curve[1:]):
        if k <= k1:
            return t0 + (t1 - t0) * (k - k0) / (k1 - k0) if k1 > k0 else t1
    return curve[-1][1]


def _worth_timing(impl: str, top_k: int, num_experts: int) -> bool:
    """Forced backends only where they are not pathological: the reference loop is slow at large k
    and the dense path computes every expert (E/k times the work, and gigabytes of buffers)."""
    if impl == "ours:reference":
        return top_k <= 4
    if impl == "ours:dense":
        return 2 * top_k >= num_experts
    return True


def _check_routers(routers: tuple[str, ...]) -> None:
    from hyperrouter.routers import ROUTERS

    if not routers:
        raise HyperRouterError("--router needs at least one router name")
    unknown = [r for r in routers if r not in ROUTERS]
    if unknown:
        raise HyperRouterError(
            f"--router: unknown router(s) {', '.join(unknown)}; valid: {', '.join(sorted(ROUTERS))}"
        )
    if len(set(routers)) != len(routers):
        raise HyperRouterError(f"--router lists a router twice: {','.join(routers)}")


def _check_against_ours(
    contenders: list[_Contender], x: Tensor
) -> dict[tuple[str, str | None], float]:
    """Relative difference of every sparse contender's output from `ours` with the same router
    (same weights), keyed by (impl, router)."""
    with torch.inference_mode():
        refs = {c.router: c.call(x).float() for c in contenders if c.impl == "ours"}
        out = {}
        for c in contenders:
            if c.impl == "dense" or c.router not in refs:
                continue
            ref = refs[c.router]
            got = c.call(x).float()
            out[(c.impl, c.router)] = round(((got - ref).norm() / ref.norm()).item(), 8)
    return out


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="bench layer", unit="case", disable=not enabled, leave=False)


def format_table(records: list[BenchRecord]) -> str:
    """A plain-text table: one line per record, grouped by expert type and mode."""
    lines = [
        f"{'expert':<7} {'mode':<6} {'k':>3}  {'impl':<32} {'router':<14} {'median ms':>10} "
        f"{'x dense':>8} {'mean k':>7} {'x smoe@pairs':>12}",
    ]
    for r in sorted(records, key=lambda r: (r.expert, r.mode != "train", r.top_k)):
        ratio = "" if r.ratio_vs_dense is None else f"{r.ratio_vs_dense:.2f}"
        router = r.router or "-"
        mean_k = r.extra.get("mean_k")
        same = r.extra.get("x_smoe_same_pairs")
        lines.append(
            f"{r.expert:<7} {r.mode:<6} {r.top_k:>3}  {r.impl:<32} {router:<14} "
            f"{r.median_ms:>10.1f} {ratio:>8} {'' if mean_k is None else f'{mean_k:.2f}':>7} "
            f"{'' if same is None else f'{same:.2f}':>12}"
        )
    return "\n".join(lines)


LEGEND = (
    "x dense: the median time over the median time of the dense floor in the same run, a dense "
    "FFN of hidden width k x d_hidden (the same active compute; 1.00 = no cost for routing); "
    "mean k: experts computed per token (below k for variable-k routers); x smoe@pairs: the "
    "time over smoe's at the same mean k (interpolated), when smoe is in the run"
)


def peers_note(records: list[BenchRecord], peers: bool) -> str | None:
    """Why the transformers peers are missing from `records`, if they were asked for."""
    if not peers or any(r.impl.startswith("peer:") for r in records):
        return None
    if not any(r.expert == "swiglu" and r.router == "smoe" for r in records):
        return None  # the Mixtral peers only join SwiGLU experts next to the smoe router
    try:
        import transformers  # noqa: F401
    except ImportError:
        return (
            "note: transformers is not installed, so its Mixtral peers were left out "
            "(bash scripts/setup.sh bench installs it)"
        )
    return "note: this transformers has no Mixtral block we can time, so its peers were left out"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_json(records: list[BenchRecord], path: str | Path) -> None:
    from hyperrouter.train.checkpoint import write_json_atomic

    write_json_atomic(Path(path), [asdict(r) for r in records])
