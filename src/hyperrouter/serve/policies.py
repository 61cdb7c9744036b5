"""Which k serves a request: static, a rule on the running load, or a policy learned in simulation.

The load controller of "Learned Best-Effort LLM Serving" (Jha et al. 2024) picks, per request,
one of several separately trained models; a HyperRouter model holds all its sizes in one set of
weights, so here the action is k. The server batches continuously (a request joins the running
ones between two generation steps), so k is chosen per request when it is admitted and stays
with it to its end. A policy sees `QueueState`: requests waiting (this one included), how long
this one has waited, the arrival rate, the running requests (their k, elapsed time, tokens left)
and this request's max_tokens.

- `static`: always the same k.
- `rule`: the largest k for which the model of the server (`Profile`: measured step and prefill
  times per k and number of running requests) predicts that this request and every running one
  still finish within margin x deadline.
- `learned`: a table from (the rule's k, waiting requests, running requests, the arrival rate
  relative to what k = E sustains; each in a few buckets) to k,
  found by policy search in `simulate`, a step-level model of the continuously batching server
  driven by the profile and the per-k quality. The table starts as the rule (each cell chooses
  the rule's k) and coordinate ascent changes one cell at a time when that raises the mean
  utility over a fixed set of simulated traffic traces (several rates, Poisson and bursty,
  common random numbers). Jha et al. train a Double DQN on the queue state; here the state has
  at most 525 cells (few of them visited) and the objective can be evaluated directly, so
  searching the policy itself optimises what is measured without a value function to fit, and
  it cannot end worse than the rule on the traces it was trained on. (The previous version,
  tabular Q-learning over queue x wait buckets, was worse than the best static k at every rate
  but one.)

A request's utility is its quality if it is answered within the deadline, else 0; the quality at
k is exp(-loss at k), the model's geometric-mean probability of the next token (2^-BPC for
characters, 1/perplexity for words), read from the run's results.json.
"""

from __future__ import annotations

import bisect
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hyperrouter.errors import HyperRouterError

POLICIES = ("static", "rule", "learned")
POLICY_VERSION = 2
WAITING_BUCKETS = (1, 2, 4, 8)  # upper edges of requests waiting (this one included): 5 buckets
RUNNING_BUCKETS = (0.25, 0.75)  # running requests / max_batch: 3 buckets
RATE_WINDOW_S = 3.0  # the arrival rate is measured over the last 3 s of arrivals
RATE_BUCKETS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # arrival rate / capacity at k = E: 7 buckets


@dataclass
class QueueState:
    """The server when a request is admitted: requests waiting (this one included), how long
    this one has waited (ms), the recent arrival rate (requests/s), the running requests as
    (k, elapsed ms, tokens left) and this request's max_tokens."""

    waiting: int
    wait_ms: float
    arrival_rate: float = 0.0
    active: list[tuple[int, float, int]] = field(default_factory=list)
    max_tokens: int = 1


def arrival_rate(window: list[float], now_s: float, first_s: float) -> float:
    """Requests/s over the last RATE_WINDOW_S seconds (`window`: the arrival times in it), or
    over the time since the first arrival when that is shorter."""
    span = min(RATE_WINDOW_S, max(now_s - first_s, 0.25))
    return len(window) / span


@dataclass
class Profile:
    """The server's cost model: the median time of one generation step at k with n running
    requests (all at k), of one prompt's prefill at k, the per-k quality, and two constants
    fitted to the real server (a per-request overhead, a scale of the model's times)."""

    ks: list[int]
    batch_sizes: list[int]  # running requests n
    step_ms: dict[str, list[float]]  # str(k) -> ms per n in batch_sizes
    prefill_ms: dict[str, float]  # str(k) -> ms for a prompt of prompt_tokens
    quality: dict[str, float]  # str(k) -> exp(-loss)
    prompt_tokens: int = 0
    max_tokens: int = 0
    machine: str = ""
    overhead_ms: float = 0.0
    scale: float = 1.0
    calibration: dict[str, Any] = field(default_factory=dict)
    sustained: dict[str, float] = field(default_factory=dict)  # str(k) -> requests/s, simulated

    def sustained_rate(self, k: int, max_batch: int) -> float:
        """The highest Poisson rate static k answers with < 1 % misses in simulation
        (`train-policy` measures it), else the full-batch throughput bound."""
        if str(k) in self.sustained:
            return self.sustained[str(k)]
        return capacity(self, max_batch, k)

    def one_step_ms(self, k: int, n: int) -> float:
        """A step of n requests at k, linear between the profiled n (beyond the largest, by
        its per-request slope)."""
        sizes, times = self.batch_sizes, self.step_ms[str(k)]
        if n <= 0:
            return 0.0
        if n <= sizes[0]:
            value = times[0]
        else:
            i = bisect.bisect_left(sizes, n)
            if i == len(sizes):
                slope = (times[-1] - times[-2]) / (sizes[-1] - sizes[-2]) if len(sizes) > 1 else 0
                value = times[-1] + slope * (n - sizes[-1])
            else:
                n0, n1, t0, t1 = sizes[i - 1], sizes[i], times[i - 1], times[i]
                value = t0 + (t1 - t0) * (n - n0) / (n1 - n0)
        return self.scale * value

    def step_time_ms(self, counts: dict[int, int]) -> float:
        """A step of the running requests, `counts` of them at each k (one forward per k)."""
        return sum(self.one_step_ms(k, n) for k, n in counts.items() if n)

    def prefill_time_ms(self, k: int) -> float:
        return self.scale * self.prefill_ms[str(k)]

    def request_ms(self, k: int, n: int) -> float:
        """A request alone with n - 1 others at k: overhead, prefill, max_tokens - 1 steps."""
        steps = max(self.max_tokens - 1, 0)
        return self.overhead_ms + self.prefill_time_ms(k) + steps * self.one_step_ms(k, n)


class Policy:
    kind = ""

    def choose(self, state: QueueState) -> int:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass
class StaticPolicy(Policy):
    k: int
    kind = "static"

    def choose(self, state: QueueState) -> int:
        return self.k

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "k": self.k}


@dataclass
class RulePolicy(Policy):
    """The largest k for which the profile predicts that this request, every running one and
    the queue behind it finish within margin x deadline, and whose sustained rate is at least
    the arrival rate over rate_margin (the smallest k when none qualifies)."""

    profile: Profile
    deadline_ms: float
    max_batch: int
    margin: float = 0.9
    rate_margin: float = 0.9
    kind = "rule"

    def fits(self, k: int, state: QueueState) -> bool:
        p = self.profile
        counts: dict[int, int] = {}
        for k_a, _, _ in state.active:
            counts[k_a] = counts.get(k_a, 0) + 1
        counts[k] = counts.get(k, 0) + 1
        step = p.step_time_ms(counts)
        prefill = p.prefill_time_ms(k)
        limit = self.margin * self.deadline_ms
        mine = p.overhead_ms + state.wait_ms + prefill + max(state.max_tokens - 1, 0) * step
        if mine > limit:
            return False
        sustained = p.sustained_rate(k, self.max_batch)
        if state.arrival_rate > self.rate_margin * sustained:
            return False  # k cannot keep up with the traffic: a queue would build
        # the queue behind this request drains at k's sustained rate
        backlog = 1000.0 * max(state.waiting - 1, 0) / max(sustained, 1e-9)
        if backlog + p.request_ms(k, self.max_batch) > limit:
            return False
        # the running requests wait for this prefill, then step at the new step time
        return all(
            p.overhead_ms + elapsed + prefill + left * step <= limit
            for _, elapsed, left in state.active
        )

    def choose(self, state: QueueState) -> int:
        for k in sorted(self.profile.ks, reverse=True):
            if self.fits(k, state):
                return k
        return min(self.profile.ks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "deadline_ms": self.deadline_ms,
            "margin": self.margin,
            "rate_margin": self.rate_margin,
        }


def capacity(profile: Profile, max_batch: int, k: int | None = None) -> float:
    """Requests/s the profile serves at k (default E) with max_batch running requests."""
    k = max(profile.ks) if k is None else k
    per_request = profile.prefill_time_ms(k) + max(profile.max_tokens - 1, 0) * (
        profile.one_step_ms(k, max_batch) / max_batch
    )
    return 1000.0 / max(per_request, 1e-9)


def features(rule_k: int, state: QueueState, max_batch: int, full_rate: float) -> str:
    """The learned policy's state cell: 'rule k, waiting bucket, running bucket, rate bucket'
    (the arrival rate relative to `full_rate`, what the server sustains at k = E)."""
    w = bisect.bisect_left(WAITING_BUCKETS, state.waiting)
    r = bisect.bisect_left(RUNNING_BUCKETS, len(state.active) / max(max_batch, 1))
    a = bisect.bisect_left(RATE_BUCKETS, state.arrival_rate / max(full_rate, 1e-9))
    return f"{rule_k},{w},{r},{a}"


@dataclass
class LearnedPolicy(Policy):
    """The k of the state's cell in a learned table; where the table is silent, the learned k
    for the rule's k in this arrival-rate bucket (`by_rate_rule`, keys 'rule k,rate bucket'),
    else the learned k of the arrival-rate bucket (`by_rate`), else the rule's k."""

    rule: RulePolicy
    table: dict[str, int] = field(default_factory=dict)
    trained: dict[str, Any] = field(default_factory=dict)
    by_rate: dict[str, int] = field(default_factory=dict)  # rate bucket -> k
    by_rate_rule: dict[str, int] = field(default_factory=dict)  # 'rule k,rate bucket' -> k
    kind = "learned"

    @property
    def ks(self) -> list[int]:
        return list(self.rule.profile.ks)

    @property
    def deadline_ms(self) -> float:
        return self.rule.deadline_ms

    def cell(self, state: QueueState) -> tuple[str, int]:
        rule_k = self.rule.choose(state)
        full_rate = capacity(self.rule.profile, self.rule.max_batch)
        return features(rule_k, state, self.rule.max_batch, full_rate), rule_k

    def choose(self, state: QueueState) -> int:
        cell, rule_k = self.cell(state)
        if cell in self.table:
            return self.table[cell]
        rate = cell.rsplit(",", 1)[1]
        pair = f"{rule_k},{rate}"
        if pair in self.by_rate_rule:
            return self.by_rate_rule[pair]
        return self.by_rate.get(rate, rule_k)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ks": self.ks,
            "deadline_ms": self.rule.deadline_ms,
            "max_batch": self.rule.max_batch,
            "margin": self.rule.margin,
            "table": self.table,
            "by_rate": self.by_rate,
            "by_rate_rule": self.by_rate_rule,
            "trained": self.trained,
        }


# ----------------------------------------------------------------------------- simulation


@dataclass
class SimResult:
    requests: int
    answered_in_time: int
    refused: int
    mean_utility: float
    mean_k: float
    mean_quality: float
    p50_ms: float
    p99_ms: float

    @property
    def miss_rate(self) -> float:
        return 1.0 - self.answered_in_time / max(self.requests, 1)


def arrivals(rate: float, duration_s: float, rng: random.Random, pattern: str = "poisson"):
    """Arrival times (ms): Poisson at `rate`, or bursty (1 s at 1.75 x rate, then 1 s at
    0.25 x rate, averaging `rate`)."""
    t, out = 0.0, []
    while True:
        r = rate
        if pattern == "bursty":
            r = rate * (1.75 if int(t / 1000.0) % 2 == 0 else 0.25)
        t += rng.expovariate(max(r, 1e-9)) * 1000.0
        if t >= duration_s * 1000.0:
            return out
        out.append(t)


def simulate(
    policy: Policy,
    profile: Profile,
    *,
    rate: float,
    duration_s: float,
    deadline_ms: float,
    max_batch: int,
    max_queue: int = 64,
    seed: int = 0,
    pattern: str = "poisson",
    max_tokens: int | None = None,
    visits: dict[str, int] | None = None,
) -> SimResult:
    """The continuously batching server, step by step: arrivals queue (refused beyond
    max_queue); between two steps queued requests are admitted up to max_batch running, each
    given k by the policy and prefilled (the running ones wait for it); a step of the running
    requests costs the profile's step time for their mix of k; a request ends after max_tokens
    tokens (the first comes from its prefill), plus the per-request overhead. `visits` counts
    the learned policy's cells."""
    rng = random.Random(seed)
    times = arrivals(rate, duration_s, rng, pattern)
    tokens = max_tokens or profile.max_tokens or 1
    arrivals_window: list[float] = []
    waiting: list[float] = []
    active: list[list[float]] = []  # [k, arrived, left]
    counts: dict[int, int] = {}
    latencies: list[float] = []
    utility = quality_sum = k_sum = 0.0
    refused = 0
    i, now = 0, 0.0
    learned = policy if isinstance(policy, LearnedPolicy) else None

    def finish(k: int, arrived: float) -> None:
        nonlocal utility, quality_sum, k_sum
        latency = now - arrived + profile.overhead_ms
        latencies.append(latency)
        q = profile.quality[str(k)]
        quality_sum += q
        k_sum += k
        if latency <= deadline_ms:
            utility += q

    while i < len(times) or waiting or active:
        if not waiting and not active:
            now = max(now, times[i])
        while i < len(times) and times[i] <= now:
            if len(waiting) >= max_queue:
                refused += 1
            else:
                waiting.append(times[i])
            arrivals_window.append(times[i])
            i += 1
        while waiting and len(active) < max_batch:
            arrived = waiting.pop(0)
            while arrivals_window and now - arrivals_window[0] > RATE_WINDOW_S * 1000.0:
                arrivals_window.pop(0)
            state = QueueState(
                len(waiting) + 1,
                now - arrived,
                arrival_rate(arrivals_window, now / 1000.0, times[0] / 1000.0),
                [(int(a[0]), now - a[1], int(a[2])) for a in active],
                tokens,
            )
            if learned is not None and visits is not None:
                cell, _ = learned.cell(state)
                visits[cell] = visits.get(cell, 0) + 1
            k = policy.choose(state)
            now += profile.prefill_time_ms(k)
            if tokens <= 1:
                finish(k, arrived)
            else:
                active.append([k, arrived, tokens - 1])
                counts[k] = counts.get(k, 0) + 1
        if active:
            # the running set stays the same until one ends or a request arrives that could
            # join: take those steps at once (the same times as one by one)
            step = profile.step_time_ms(counts)
            steps = int(min(entry[2] for entry in active))
            if i < len(times) and len(active) < max_batch and step > 0:
                steps = min(steps, max(1, math.ceil((times[i] - now) / step)))
            now += steps * step
            still = []
            for entry in active:
                entry[2] -= steps
                if entry[2] <= 0:
                    counts[int(entry[0])] -= 1
                    finish(int(entry[0]), entry[1])
                else:
                    still.append(entry)
            active = still
    latencies.sort()
    n = len(latencies) + refused

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0.0

    answered = len(latencies)
    return SimResult(
        n,
        sum(1 for lat in latencies if lat <= deadline_ms),
        refused,
        utility / max(n, 1),
        k_sum / max(answered, 1),
        quality_sum / max(answered, 1),
        pct(0.5),
        pct(0.99),
    )


def search_entry(
    table: dict[str, int], key: str, ks: list[int], best: float, objective
) -> tuple[bool, float, int]:
    """Try every k (and no entry) for `table[key]`, keep the best if it beats `best`:
    (changed, best, evaluations)."""
    current = table.pop(key, None)
    evaluations = 0
    changed = False
    for k in [None, *ks]:
        if k == current:
            continue
        if k is None:
            table.pop(key, None)
        else:
            table[key] = k
        value = objective()
        evaluations += 1
        if value > best + 1e-9:
            best, current, changed = value, k, True
    if current is None:
        table.pop(key, None)
    else:
        table[key] = current
    return changed, best, evaluations


def train_learned(
    profile: Profile,
    *,
    deadline_ms: float,
    max_batch: int,
    max_queue: int = 64,
    rates: list[float],
    duration_s: float = 20.0,
    passes: int = 2,
    max_cells: int = 60,
    seed: int = 0,
    log=None,
) -> LearnedPolicy:
    """Policy search from the rule, keeping a change only if the mean utility over the training
    traces (each rate Poisson and bursty, fixed seeds) rises: first one k for all the states of
    an arrival-rate bucket (or the rule there), then one k for each of the rule's k within a
    rate bucket, then, for the most visited cells in turn, every other k; `passes` rounds of
    the three or until nothing changes."""
    rule = RulePolicy(profile, deadline_ms, max_batch)
    policy = LearnedPolicy(rule)
    rng = random.Random(seed)
    traces = [
        (rate, pattern, rng.randrange(1 << 30))
        for rate in rates
        for pattern in ("poisson", "bursty")
    ]
    start = time.perf_counter()

    def objective(visits: dict[str, int] | None = None) -> float:
        total = 0.0
        for rate, pattern, trace_seed in traces:
            total += simulate(
                policy,
                profile,
                rate=rate,
                duration_s=duration_s,
                deadline_ms=deadline_ms,
                max_batch=max_batch,
                max_queue=max_queue,
                seed=trace_seed,
                pattern=pattern,
                visits=visits,
            ).mean_utility
        return total / len(traces)

    ks = list(profile.ks)
    visits: dict[str, int] = {}
    best = start_value = objective(visits)
    evaluations = 1
    cells: list[str] = []
    for round_ in range(passes):
        changed = False
        seen = sorted({c.rsplit(",", 1)[1] for c in visits})  # rate buckets met
        for bucket in seen:
            improved, best, used = search_entry(policy.by_rate, bucket, ks, best, objective)
            changed, evaluations = changed or improved, evaluations + used
        visits = {}
        objective(visits)
        evaluations += 1
        pairs = sorted({f"{c.split(',')[0]},{c.rsplit(',', 1)[1]}" for c in visits})
        for pair in pairs:  # (rule k, rate bucket) met
            improved, best, used = search_entry(policy.by_rate_rule, pair, ks, best, objective)
            changed, evaluations = changed or improved, evaluations + used
        visits = {}
        objective(visits)
        evaluations += 1
        cells = sorted(visits, key=lambda c: -visits[c])[:max_cells]
        for cell in cells:
            rule_k, rate = cell.split(",")[0], cell.rsplit(",", 1)[1]
            fallback = policy.by_rate_rule.get(
                f"{rule_k},{rate}", policy.by_rate.get(rate, int(rule_k))
            )
            current = policy.table.get(cell, fallback)
            for k in profile.ks:
                if k == current:
                    continue
                policy.table[cell] = k
                value = objective()
                evaluations += 1
                if value > best + 1e-9:
                    best, current, changed = value, k, True
            if current == fallback:
                policy.table.pop(cell, None)
            else:
                policy.table[cell] = current
        if log is not None:
            log(f"policy search round {round_ + 1}: mean utility {best:.5f}")
        if not changed:
            break
    policy.trained = {
        "method": "policy search from the rule (coordinate ascent: rate buckets, rule k per "
        "rate bucket, cells)",
        "rates": rates,
        "duration_s": duration_s,
        "traces": len(traces),
        "cells_searched": len(cells),
        "evaluations": evaluations,
        "utility_rule": round(start_value, 6),
        "utility_learned": round(best, 6),
        "seconds": round(time.perf_counter() - start, 2),
        "max_batch": max_batch,
    }
    return policy


# ----------------------------------------------------------------------------- files


def save_policy(path: Path, policy: Policy, profile: Profile, meta: dict[str, Any]) -> None:
    from hyperrouter.train.checkpoint import write_json_atomic

    write_json_atomic(
        path,
        {
            "version": POLICY_VERSION,
            "policy": policy.to_dict(),
            "profile": asdict(profile),
            **meta,
        },
    )


def load_policy_file(path: Path) -> tuple[dict[str, Any], Profile]:
    try:
        data = json.loads(path.read_text())
        profile = Profile(**data["profile"])
    except FileNotFoundError:
        raise HyperRouterError(
            f"{path}: no policy file; make one with `hyperrouter serve train-policy RUN`"
        ) from None
    except (ValueError, KeyError, TypeError):
        raise HyperRouterError(f"{path} is not a hyperrouter policy file") from None
    if data.get("version") != POLICY_VERSION:
        raise HyperRouterError(
            f"{path}: policy file version {data.get('version')}, this hyperrouter reads "
            f"{POLICY_VERSION}; run train-policy again"
        )
    return data, profile


def build_policy(
    kind: str,
    *,
    k: int | None,
    num_experts: int,
    deadline_ms: float,
    max_batch: int,
    policy_file: Path | None,
) -> Policy:
    if kind not in POLICIES:
        raise HyperRouterError(f"unknown --policy {kind!r}; valid: {', '.join(POLICIES)}")
    if kind == "static":
        return StaticPolicy(k if k is not None else num_experts)
    if policy_file is None:
        raise HyperRouterError(f"--policy {kind} needs a policy file (train-policy makes one)")
    data, profile = load_policy_file(policy_file)
    bad = [k for k in profile.ks if not 1 <= k <= num_experts]
    if bad:
        raise HyperRouterError(
            f"{policy_file} chooses k = {sorted(bad)}, outside [1, {num_experts}] of this model; "
            f"run train-policy for this run"
        )
    if kind == "rule":
        return RulePolicy(profile, deadline_ms, max_batch)
    stored = data["policy"]
    if stored.get("kind") != "learned":
        raise HyperRouterError(f"{policy_file} holds no learned policy")
    if abs(stored["deadline_ms"] - deadline_ms) > 1e-9:
        raise HyperRouterError(
            f"{policy_file} was trained for --deadline-ms {stored['deadline_ms']:g}, not "
            f"{deadline_ms:g}; train it again for this deadline"
        )
    if stored["max_batch"] != max_batch:
        raise HyperRouterError(
            f"{policy_file} was trained for --max-batch {stored['max_batch']}, not {max_batch}; "
            f"train it again for this batch limit"
        )
    rule = RulePolicy(
        profile,
        stored["deadline_ms"],
        stored["max_batch"],
        stored["margin"],
        stored.get("rate_margin", 0.9),
    )
    return LearnedPolicy(
        rule,
        dict(stored["table"]),
        stored["trained"],
        dict(stored.get("by_rate", {})),
        dict(stored.get("by_rate_rule", {})),
    )
