"""Is torch._grouped_mm worth using on this CPU? Its kernel against one mm per expert, then our
`grouped_mm` backend against the `grouped` one (the expert loop), train and inference.

    python benchmarks/grouped_mm_cpu.py
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184 \
        python benchmarks/grouped_mm_cpu.py      # without glibc's fresh-mmap page faults
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from hyperrouter import MoE

E, D_MODEL, D_HIDDEN, TOKENS = 16, 256, 512, 8192


def medians(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median ms of each function, warmed up, timed round-robin."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def kernel_vs_loop(rows_per_expert: int = 4096, width: int = 2 * D_HIDDEN) -> None:
    x = torch.randn(E * rows_per_expert, D_MODEL)
    w = torch.randn(E, D_MODEL, width)
    offsets = torch.arange(1, E + 1, dtype=torch.int32) * rows_per_expert
    out = torch.empty(E * rows_per_expert, width)

    def loop() -> None:
        for e in range(E):
            rows = slice(e * rows_per_expert, (e + 1) * rows_per_expert)
            torch.mm(x[rows], w[e], out=out[rows])

    result = medians({"grouped_mm": lambda: torch._grouped_mm(x, w, offs=offsets), "loop": loop}, 8)
    print(
        f"kernel, [{E * rows_per_expert}, {D_MODEL}] x {E} x [{D_MODEL}, {width}]: "
        + ", ".join(f"{name} {ms:.1f} ms" for name, ms in result.items())
    )


def backends(top_k: int, activation: str) -> None:
    torch.manual_seed(0)
    options = {"router_options": {"bias": False}, "bias": False} if activation == "swiglu" else {}
    layer = MoE(D_MODEL, E, D_HIDDEN, top_k, router="smoe", activation=activation, **options)
    x, grad = torch.randn(TOKENS, D_MODEL), torch.randn(TOKENS, D_MODEL)

    def step(backend: str, mode: str) -> Callable[[], None]:
        def train() -> None:
            for p in layer.parameters():
                p.grad = None
            layer(x.detach().requires_grad_(), backend=backend).backward(grad)

        def infer() -> None:
            with torch.inference_mode():
                layer(x, backend=backend)

        return train if mode == "train" else infer

    fns = {f"{b}/{m}": step(b, m) for m in ("train", "infer") for b in ("grouped", "grouped_mm")}
    result = medians(fns, 7)
    print(
        f"k={top_k} {activation}: "
        + ", ".join(f"{name} {ms:.0f} ms" for name, ms in result.items())
    )


if __name__ == "__main__":
    kernel_vs_loop()
    for k in (2, 8):
        for act in ("relu", "swiglu"):
            backends(k, act)
