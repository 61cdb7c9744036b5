"""The per-k latency and quality profile of a served model, and `train-policy` around it."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from hyperrouter.errors import HyperRouterError
from hyperrouter.serve.engine import Engine, Sampling, Sequence
from hyperrouter.serve.policies import (
    Profile,
    RulePolicy,
    StaticPolicy,
    save_policy,
    simulate,
    train_learned,
)
from hyperrouter.train import checkpoint as ckpt


def run_quality(folder: Path, ks: list[int]) -> dict[str, float]:
    """exp(-loss) per k from the run's results.json (test split): 2^-BPC or 1/perplexity."""
    path = folder / "results.json"
    try:
        results = ckpt.read_json(path)
        by_k, metric = results["by_top_k"], results["metric"]
    except (FileNotFoundError, KeyError, TypeError):
        raise HyperRouterError(
            f"{path}: no test results per k; evaluate the run first (train writes them)"
        ) from None
    missing = [k for k in ks if str(k) not in by_k]
    if missing:
        raise HyperRouterError(f"{path} has no test result at k = {missing}")
    if metric == "bpc":
        return {str(k): 2.0 ** -float(by_k[str(k)]) for k in ks}
    return {str(k): 1.0 / float(by_k[str(k)]) for k in ks}


def measure_profile(
    engine: Engine,
    ks: list[int],
    batch_sizes: list[int],
    *,
    prompt_tokens: int,
    max_tokens: int,
    repeats: int = 3,
    quality: dict[str, float],
) -> Profile:
    """Median wall time of one batch of n requests (prompt_tokens in, max_tokens out, sampled at
    temperature 1) at each k and n, round-robin over k after one warm-up each."""
    from hyperrouter.bench import machine_description

    gen = torch.Generator().manual_seed(0)
    vocab_ids = [i for i in range(len(engine.vocab)) if i != engine.vocab.unk_id]
    prompt = [
        vocab_ids[int(i)] for i in torch.randint(len(vocab_ids), (prompt_tokens,), generator=gen)
    ]

    def batch(n: int) -> list[Sequence]:
        out = []
        for i in range(n):
            g = torch.Generator().manual_seed(i)
            out.append(Sequence(list(prompt), Sampling(max_tokens, 1.0, 1.0, [], i), g))
        return out

    times: dict[str, list[float]] = {}
    for n in batch_sizes:
        for k in ks:
            engine.generate_batch(batch(n), k)  # warm-up
        samples: dict[int, list[float]] = {k: [] for k in ks}
        for _ in range(repeats):
            for k in ks:
                seqs = batch(n)
                start = time.perf_counter()
                engine.generate_batch(seqs, k)
                samples[k].append((time.perf_counter() - start) * 1e3)
        for k in ks:
            times.setdefault(str(k), []).append(round(statistics.median(samples[k]), 3))
    return Profile(
        list(ks),
        list(batch_sizes),
        times,
        quality,
        prompt_tokens,
        max_tokens,
        machine_description(),
    )


def train_policy(
    engine: Engine,
    *,
    run_dir: Path,
    out: Path,
    ks: list[int],
    deadline_ms: float,
    max_batch: int,
    prompt_tokens: int,
    max_tokens: int,
    episodes: int,
    repeats: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Profile, learn, compare in simulation, save: the policy file and a summary."""
    quality = run_quality(run_dir, ks)
    sizes = sorted({1, *(2**i for i in range(1, int(math.log2(max_batch)) + 1)), max_batch})
    profile = measure_profile(
        engine,
        ks,
        sizes,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        repeats=repeats,
        quality=quality,
    )
    full = profile.service_ms(max(ks), max_batch)
    capacity = 1000.0 * max_batch / full  # requests/s static k = E sustains with full batches
    rates = [round(capacity * f, 3) for f in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)]
    # learned where a choice matters: up to twice what k = E sustains (beyond, every k drowns)
    train_rates = [round(capacity * f, 3) for f in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)]
    learned = train_learned(
        profile,
        deadline_ms=deadline_ms,
        max_batch=max_batch,
        rates=train_rates,
        episodes=episodes,
        seed=seed,
    )
    table = []
    contenders = {f"static k={k}": StaticPolicy(k) for k in ks}
    contenders["rule"] = RulePolicy(profile, deadline_ms, max_batch)
    contenders["learned"] = learned
    for rate in rates:
        for name, policy in contenders.items():
            sim = simulate(
                policy,
                profile,
                rate=rate,
                duration_s=60.0,
                deadline_ms=deadline_ms,
                max_batch=max_batch,
                seed=12345,
            )
            table.append(
                {
                    "rate": rate,
                    "policy": name,
                    "utility": round(sim.mean_utility, 5),
                    "miss_rate": round(sim.miss_rate, 4),
                    "mean_k": round(sim.mean_k, 3),
                    "p99_ms": round(sim.p99_ms, 1),
                }
            )
    save_policy(
        out,
        learned,
        profile,
        {
            "run": str(run_dir),
            "checkpoint": str(engine.run.folder),
            "deadline_ms": deadline_ms,
            "max_batch": max_batch,
            "simulated": table,
        },
    )
    return {"profile": profile, "rates": rates, "table": table}


def format_simulation(table: list[dict[str, Any]]) -> str:
    lines = [
        f"{'rate/s':>8} {'policy':<12} {'utility':>8} {'misses':>7} {'mean k':>7} {'p99 ms':>9}"
    ]
    for row in table:
        lines.append(
            f"{row['rate']:>8.2f} {row['policy']:<12} {row['utility']:>8.4f} "
            f"{row['miss_rate']:>7.1%} {row['mean_k']:>7.2f} {row['p99_ms']:>9.1f}"
        )
    return "\n".join(lines)
