"""Does routing interface v2 cost anything when its features are unused? A/B timing of the MoE
layer against an older checkout of the code.

Each measurement runs in a fresh process importing hyperrouter from the given source folder;
processes alternate A, B, A, B... so that machine noise hits both alike, and medians are taken
over all processes. Layer sizes are those of `hyperrouter bench layer` (E = 16, d_model 256,
d_hidden 512, 8192 tokens, fp32), router `hyperrouter` and `smoe`, train (forward + backward) and
inference (forward).

    git worktree add /tmp/hr-v1 6f6b0ef
    python benchmarks/routing_overhead.py --a /tmp/hr-v1/src --b src --rounds 5 --json out.json

`--tiny` times instead the fixed cost of one call, where Python overhead dominates: a 16-token,
d_model 32, 8-expert layer in inference, 1 thread, 500 calls per sample, median of 7 samples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from hyperrouter import MoE
torch.manual_seed(0)
ks, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
out = {}
for router in ("hyperrouter", "smoe"):
    for k in ks:
        layer = MoE(256, 16, 512, k, router=router)
        x = torch.randn(8192, 256, requires_grad=True)
        grad = torch.randn(8192, 256)
        def train():
            layer.zero_grad(set_to_none=True)
            layer(x).backward(grad)
        def infer():
            with torch.inference_mode():
                layer(x)
        for mode, fn in (("train", train), ("infer", infer)):
            fn()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            out[f"{router} {mode} k={k}"] = sorted(times)[len(times) // 2] * 1000
print(json.dumps(out))
"""


TINY = r"""
import json, sys, time, torch
from hyperrouter import MoE
torch.set_num_threads(1)
torch.manual_seed(0)
layer = MoE(32, 8, 32, 2, router="smoe").eval()
x = torch.randn(16, 32)
with torch.inference_mode():
    for _ in range(200):
        layer(x)
    samples = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(500):
            layer(x)
        samples.append((time.perf_counter() - start) / 500 * 1e6)
print(json.dumps({"tiny infer call (us)": sorted(samples)[3]}))
"""


def run(src: str, ks: list[int], repeats: int, tiny: bool = False) -> dict[str, float]:
    env_code = f"import sys; sys.path.insert(0, {src!r}); " + (TINY if tiny else CHILD)
    res = subprocess.run(
        [sys.executable, "-c", env_code, json.dumps(ks), str(repeats)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="source folder of the baseline (holds hyperrouter/)")
    p.add_argument("--b", required=True, help="source folder of the candidate")
    p.add_argument("--rounds", type=int, default=5, help="A/B process pairs (default 5)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per process (default 5)")
    p.add_argument("--ks", default="1,2,8", help="k values (default 1,2,8)")
    p.add_argument("--json", help="write the raw medians here")
    p.add_argument("--tiny", action="store_true", help="time the fixed cost of a tiny call")
    args = p.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    samples: dict[str, dict[str, list[float]]] = {"a": {}, "b": {}}
    for i in range(args.rounds):
        for side in ("a", "b"):
            for key, ms in run(getattr(args, side), ks, args.repeats, args.tiny).items():
                samples[side].setdefault(key, []).append(ms)
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
    print(f"{'case':<26} {'A ms':>9} {'B ms':>9} {'B/A':>6}")
    rows = {}
    for key in samples["a"]:
        a, b = statistics.median(samples["a"][key]), statistics.median(samples["b"][key])
        rows[key] = {"a_ms": a, "b_ms": b, "ratio": b / a}
        print(f"{key:<26} {a:>9.1f} {b:>9.1f} {b / a:>6.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "samples": samples}, f, indent=1)


if __name__ == "__main__":
    main()
