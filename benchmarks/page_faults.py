"""Memory freshly faulted in per call by each contender of `hyperrouter bench layer` (Linux).

Large CPU allocations (over 32 MB with glibc's malloc) are new mmaps on every call; the kernel
zero-fills each page on first touch, which is paid inside whatever operator writes it first
(usually a GEMM). This script counts those minor page faults per call with getrusage, with the
same sizes and contenders as the benchmark, to show how much of a timing is the allocator.

    python benchmarks/page_faults.py --top-k 2,8 --experts swiglu
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184 \
        python benchmarks/page_faults.py          # the same with glibc's mmap switched off
"""

from __future__ import annotations

import argparse
import resource

import torch

from hyperrouter.bench import _contenders, _step


def faulted_mb(step, calls: int = 3) -> float:
    """MB first-touched per call (4 KiB pages), after two warm-up calls."""
    step()
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return (after - before) / calls * 4096 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", default="1,2,4,8,16")
    parser.add_argument("--experts", default="relu,swiglu")
    parser.add_argument("--modes", default="train,infer")
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, 256, generator=gen)
    grad = torch.randn(args.tokens, 256, generator=gen)
    print(f"{'expert':7s} {'mode':6s} {'k':>3s}  {'impl':30s} MB faulted per call")
    for expert in args.experts.split(","):
        for k in (int(v) for v in args.top_k.split(",")):
            for mode in args.modes.split(","):
                for c in _contenders(expert, k, 16, 256, 512, (), peers=True):
                    mb = faulted_mb(_step(c, x, grad, mode))
                    print(f"{expert:7s} {mode:6s} {k:3d}  {c.impl:30s} {mb:8.0f}")


if __name__ == "__main__":
    main()
