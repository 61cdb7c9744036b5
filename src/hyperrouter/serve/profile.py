"""The cost model of a served model (`Profile`), fitted to the real server, and `train-policy`.

`measure_profile` times the engine itself: one prompt's prefill at each k, and a generation step
at each k for n running requests (the n of `batch_sizes`), medians of round-robin repeats.
`calibrate` then fits the profile to the server behind HTTP: the per-request overhead (encoding,
the event loop, HTTP) from requests sent one at a time, and a scale of the model's times from an
open-loop Poisson load at about the capacity of k = E, where the simulator is asked to give the
same median latency as the server gave for the same arrival times. `train_policy` measures,
calibrates, searches the learned policy in simulation, compares it with the static k and the
rule there, and saves everything in one versioned policy file next to the run.
"""

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
    StaticPolicy,
    capacity,
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


def profile_prompts(engine: Engine, prompt_tokens: int, count: int = 16) -> list[str]:
    """Seeded random prompts of `prompt_tokens` symbols the model's vocabulary holds."""
    gen = torch.Generator().manual_seed(0)
    symbols = [i for i in range(len(engine.vocab)) if i != engine.vocab.unk_id]
    out = []
    for _ in range(count):
        ids = torch.randint(len(symbols), (prompt_tokens,), generator=gen)
        text = engine.vocab.decode(symbols[int(i)] for i in ids)
        try:
            engine.encode(text)
        except HyperRouterError:
            continue
        out.append(text)
    return out or ["the "]


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
    """Median prefill time of one prompt and median time of one generation step with n running
    requests, at each k, round-robin over k after a warm-up."""
    from hyperrouter.bench import machine_description

    gen = torch.Generator().manual_seed(0)
    vocab_ids = [i for i in range(len(engine.vocab)) if i != engine.vocab.unk_id]
    # a different prompt per request: requests that route alike would touch fewer experts than
    # real traffic does, and the grouped kernels' cost grows with the experts touched
    prompts = [
        [vocab_ids[int(i)] for i in torch.randint(len(vocab_ids), (prompt_tokens,), generator=gen)]
        for _ in range(max(batch_sizes))
    ]
    steps = max(max_tokens - 1, 1)

    def sequences(n: int) -> list[Sequence]:
        out = []
        for i in range(n):
            g = torch.Generator().manual_seed(i)
            out.append(Sequence(list(prompts[i]), Sampling(max_tokens, 1.0, 1.0, [], i), g))
        return out

    def prefill_ms(k: int) -> float:
        seq = sequences(1)[0]
        start = time.perf_counter()
        engine.prefill(seq, k)
        return (time.perf_counter() - start) * 1e3

    def step_ms(k: int, n: int) -> float:
        seqs = sequences(n)
        for seq in seqs:
            engine.prefill(seq, k)
            engine.sample(seq)
        start = time.perf_counter()
        for _ in range(steps):
            engine.step(seqs, k)
            for seq in seqs:
                seq.out_ids.append(int(seq.logits.argmax()))
        return (time.perf_counter() - start) * 1e3 / steps

    for k in ks:  # warm-up
        prefill_ms(k)
        step_ms(k, batch_sizes[-1])
    prefill: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(repeats):
        for k in ks:
            prefill[k].append(prefill_ms(k))
    step: dict[str, list[float]] = {}
    for n in batch_sizes:
        samples: dict[int, list[float]] = {k: [] for k in ks}
        for _ in range(repeats):
            for k in ks:
                samples[k].append(step_ms(k, n))
        for k in ks:
            step.setdefault(str(k), []).append(round(statistics.median(samples[k]), 3))
    return Profile(
        list(ks),
        list(batch_sizes),
        step,
        {str(k): round(statistics.median(prefill[k]), 3) for k in ks},
        quality,
        prompt_tokens,
        max_tokens,
        machine_description(),
    )


def calibrate(
    app_factory,
    profile: Profile,
    *,
    deadline_ms: float,
    max_batch: int,
    max_queue: int,
    prompts: list[str],
    seconds: float,
    log=print,
) -> Profile:
    """Fit the profile's overhead and scale to the real server (module docstring): requests one
    at a time at k = E give the overhead; an open-loop Poisson load at 0.9 x the profile's
    capacity of k = E gives the scale (bisection on the simulator's median latency)."""
    import asyncio

    from hyperrouter.serve import loadtest

    k_max = max(profile.ks)
    server = loadtest.LocalServer(app_factory(StaticPolicy(k_max)))
    try:

        async def one_at_a_time(count: int) -> list[float]:
            import httpx

            out = []
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                for i in range(count):
                    body = {"prompt": prompts[i % len(prompts)], "max_tokens": profile.max_tokens}
                    start = time.perf_counter()
                    r = await client.post("/v1/completions", json={**body, "seed": i})
                    if r.status_code != 200:
                        raise HyperRouterError(f"calibration request failed: {r.text[:200]}")
                    out.append((time.perf_counter() - start) * 1e3)
            return out

        alone = asyncio.run(one_at_a_time(12))[2:]  # the first two warm the server up
        predicted = profile.prefill_time_ms(k_max) + (profile.max_tokens - 1) * profile.one_step_ms(
            k_max, 1
        )
        overhead = max(0.0, statistics.median(alone) - predicted)
        rate = round(0.9 * capacity(profile, max_batch), 3)
        seed = 4242
        results = loadtest.drive_in_own_process(
            server.url,
            rate,
            seconds,
            deadline_ms,
            "poisson",
            prompts,
            profile.max_tokens,
            seed=seed,
        )
    finally:
        server.stop()
    served = sorted(r["latency_ms"] for r in results if r["status"] == 200)
    if not served:
        raise HyperRouterError("calibration: the server answered no request of the load")
    real = statistics.median(served)
    fitted = Profile(**{**profile.__dict__, "overhead_ms": overhead})

    def sim_median(scale: float) -> float:
        fitted.scale = scale
        return simulate(
            StaticPolicy(k_max),
            fitted,
            rate=rate,
            duration_s=seconds,
            deadline_ms=deadline_ms,
            max_batch=max_batch,
            max_queue=max_queue,
            seed=seed,
        ).p50_ms

    low, high = 0.25, 8.0
    for _ in range(30):
        mid = math.sqrt(low * high)
        if sim_median(mid) < real:
            low = mid
        else:
            high = mid
    fitted.scale = round(math.sqrt(low * high), 4)
    fitted.calibration = {
        "alone_ms": round(statistics.median(alone), 2),
        "profile_alone_ms": round(predicted, 2),
        "rate": rate,
        "seconds": seconds,
        "server_p50_ms": round(real, 2),
        "simulated_p50_ms": round(sim_median(fitted.scale), 2),
    }
    log(
        f"calibration: overhead {overhead:.1f} ms per request; at {rate:g} requests/s the server's "
        f"median latency {real:.0f} ms needs the model's times x {fitted.scale:.3f}"
    )
    return fitted


def sustained_rates(
    profile: Profile, *, deadline_ms: float, max_batch: int, max_queue: int, seconds: float = 30
) -> dict[str, float]:
    """Per k, the highest Poisson rate static k answers with < 1 % misses in the simulator
    (bisection between 2 % and 2x the full-batch bound; 30 s of arrivals, one fixed trace)."""
    out = {}
    for k in profile.ks:
        low, high = 0.02 * capacity(profile, max_batch, k), 2.0 * capacity(profile, max_batch, k)
        for _ in range(14):
            mid = (low + high) / 2
            sim = simulate(
                StaticPolicy(k),
                profile,
                rate=mid,
                duration_s=seconds,
                deadline_ms=deadline_ms,
                max_batch=max_batch,
                max_queue=max_queue,
                seed=777,
            )
            low, high = (mid, high) if sim.miss_rate < 0.01 else (low, mid)
        out[str(k)] = round(low, 3)
    return out


def train_policy(
    engine: Engine,
    *,
    run_dir: Path,
    out: Path,
    ks: list[int],
    deadline_ms: float,
    max_batch: int,
    max_queue: int,
    prompt_tokens: int,
    max_tokens: int,
    repeats: int,
    passes: int = 2,
    calibrate_seconds: float = 0.0,
    app_factory=None,
    profile: Profile | None = None,
    seed: int = 0,
    log=print,
) -> dict[str, Any]:
    """Profile, calibrate, learn, compare in simulation, save: the policy file and a summary.
    With `profile` (one measured before) only the learning and the comparison run again."""
    if profile is None:
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
    else:
        ks = list(profile.ks)
        calibrate_seconds = 0.0
    if calibrate_seconds > 0 and app_factory is not None:
        profile = calibrate(
            app_factory,
            profile,
            deadline_ms=deadline_ms,
            max_batch=max_batch,
            max_queue=max_queue,
            prompts=profile_prompts(engine, prompt_tokens),
            seconds=calibrate_seconds,
            log=log,
        )
    profile.sustained = sustained_rates(
        profile, deadline_ms=deadline_ms, max_batch=max_batch, max_queue=max_queue
    )
    full = capacity(profile, max_batch)
    # learned where a choice matters: from half of what k = E sustains to where k = 1 drowns
    top = max(2.0, 1.2 * capacity(profile, max_batch, min(ks)) / full)
    factors = sorted({0.5, 0.75, 1.0, 1.25, 1.5, 2.0, round(top, 2)})
    train_rates = [round(full * f, 3) for f in factors if f <= top]
    learned = train_learned(
        profile,
        deadline_ms=deadline_ms,
        max_batch=max_batch,
        max_queue=max_queue,
        rates=train_rates,
        passes=passes,
        seed=seed,
        log=log,
    )
    rates = [round(full * f, 3) for f in (0.5, 1.0, 1.5, 2.0, 3.0)]
    table = []
    contenders = {f"static k={k}": StaticPolicy(k) for k in ks}
    contenders["rule"] = learned.rule
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
                max_queue=max_queue,
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
            "capacity_k_max": round(full, 3),
            "simulated": table,
        },
    )
    return {"profile": profile, "rates": rates, "table": table, "learned": learned}


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
