"""Variable k per token against static k at the same number of kept (token, expert) pairs.

    python benchmarks/variable_k.py [--tokens 8192] [--repeats 7] [--ks 1,2,4] [--json PATH]

An `smoe` MoE layer (16 experts, d_model 256, d_hidden 512, ReLU, fp32, the `bench layer` sizes)
whose gate is scaled up so that routing probabilities are peaked and the number of experts per
token really varies. For each target k: static k, then top-p and weight-ratio skipping with their
threshold bisected so that the mean number of experts per token is within 2 % of k (k_max = E),
inference (forward, no grad) and training (forward + backward) medians, round-robin. The claim
checked: the per-token policies cost what static k costs for the same kept pairs (the grouped
backend computes only those); what they add is the router's top-E selection and the policy's
sort. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from hyperrouter import MoE
from hyperrouter.bench import machine_description, timed_ms
from hyperrouter.moe.policies import TopP, WeightRatio

E, D, H = 16, 256, 512


def mean_k(layer: MoE, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return layer(x, return_details=True).stats.mean_k.item()


def matched(layer: MoE, x: torch.Tensor, make, target: float, lo: float, hi: float, rising: bool):
    """The policy whose mean k is closest to `target` (bisection on its threshold)."""
    best = None
    for _ in range(30):
        mid = (lo + hi) / 2
        layer.token_policy = make(mid)
        got = mean_k(layer, x)
        if best is None or abs(got - target) < abs(best[1] - target):
            best = (mid, got)
        if abs(got - target) <= 0.02 * target:
            break
        if (got < target) == rising:
            lo = mid
        else:
            hi = mid
    layer.token_policy = None
    return make(best[0]), best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ks", default="1,2,4")
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args()
    torch.manual_seed(0)
    layer = MoE(D, E, H, 1, router="smoe")
    with torch.no_grad():
        layer.router.gate.weight.mul_(10.0)  # peaked probabilities: k really varies per token
    x = torch.randn(args.tokens, D)
    grad = torch.randn(args.tokens, D)
    records = []
    for k in [int(v) for v in args.ks.split(",")]:
        cases = [("static", None, float(k))]
        if k < E:
            policy, got = matched(layer, x, lambda p: TopP(p=p), k, 1e-4, 1.0, True)
            cases.append((policy.label, policy, got))
            policy, got = matched(layer, x, lambda r: WeightRatio(r=r), k, 0.0, 1.0, False)
            cases.append((policy.label, policy, got))
        for mode in ("infer", "train"):
            layer.train(mode == "train")

            def step(policy, mode=mode, k=k):
                layer.token_policy = policy
                if mode == "infer":
                    with torch.inference_mode():
                        layer(x, top_k=k)
                else:
                    layer.zero_grad(set_to_none=True)
                    layer(x.requires_grad_(False), top_k=k).backward(grad)

            for _, policy, _ in cases:
                step(policy)  # warm-up
            times = {name: [] for name, _, _ in cases}
            for _ in range(args.repeats):
                for name, policy, _ in cases:
                    times[name].append(timed_ms(lambda p=policy: step(p), torch.device("cpu")))
            static_ms = statistics.median(times["static"])
            for name, _, got in cases:
                ms = statistics.median(times[name])
                records.append(
                    {
                        "k": k,
                        "mode": mode,
                        "policy": name,
                        "mean_k": round(got, 3),
                        "median_ms": round(ms, 3),
                        "vs_static": round(ms / static_ms, 3),
                        "spread_ms": [round(min(times[name]), 3), round(max(times[name]), 3)],
                    }
                )
    layer.token_policy = None
    print(machine_description())
    print(f"{'k':>3} {'mode':<6} {'policy':<22} {'mean k':>7} {'ms':>9} {'vs static':>9}")
    for r in records:
        print(
            f"{r['k']:>3} {r['mode']:<6} {r['policy']:<22} {r['mean_k']:>7.2f} "
            f"{r['median_ms']:>9.2f} {r['vs_static']:>9.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_description(), "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
