"""Which k serves the next batch: static, a rule on the queue, or a policy learned in simulation.

The load controller of "Learned Best-Effort LLM Serving" (Jha et al. 2024) picks, per request,
one of several separately trained models; a HyperRouter model holds all its sizes in one set of
weights, so here the action is k. Every policy sees the queue when a batch starts (`QueueState`:
requests waiting, including the batch's own, the oldest one's wait and the arrival rate) and
returns k.

- `static`: always the same k.
- `rule`: the largest k whose predicted service time (the measured profile) still lets the oldest
  waiting request and the rest of the backlog finish within the deadline.
- `learned`: tabular Q-learning over a discretised queue state (queue length bucket x the oldest
  request's wait as a share of the deadline), trained offline in `simulate`, a discrete-event
  model of the server driven by the measured per-k latency profile and the per-k quality. Jha
  et al. train a Double DQN on a continuous state; the state here has 7 x 5 cells and 1-5 actions,
  small enough that a table learns it exactly in seconds, with no function approximation to tune.

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
POLICY_VERSION = 1
QUEUE_BUCKETS = (1, 2, 4, 8, 16, 32)  # upper edges: 7 buckets, the last open
WAIT_BUCKETS = (0.25, 0.5, 0.75, 1.0)  # oldest wait / deadline: 5 buckets


@dataclass
class QueueState:
    """The queue when a batch starts: requests waiting (the batch's own included), how long the
    oldest has waited (ms) and the recent arrival rate (requests/s)."""

    queued: int
    oldest_wait_ms: float
    arrival_rate: float = 0.0


@dataclass
class Profile:
    """Measured per-k cost of a batch of n requests of the profiled size, and per-k quality."""

    ks: list[int]
    batch_sizes: list[int]
    batch_ms: dict[str, list[float]]  # str(k) -> ms per batch size in batch_sizes
    quality: dict[str, float]  # str(k) -> exp(-loss)
    prompt_tokens: int = 0
    max_tokens: int = 0
    machine: str = ""

    def service_ms(self, k: int, n: int) -> float:
        """Batch time at k for n requests, linear between the profiled batch sizes (and beyond
        the largest, by its per-request slope)."""
        sizes, times = self.batch_sizes, self.batch_ms[str(k)]
        if n <= sizes[0]:
            return times[0]
        i = bisect.bisect_left(sizes, n)
        if i == len(sizes):
            slope = (times[-1] - times[-2]) / (sizes[-1] - sizes[-2]) if len(sizes) > 1 else 0.0
            return times[-1] + slope * (n - sizes[-1])
        n0, n1, t0, t1 = sizes[i - 1], sizes[i], times[i - 1], times[i]
        return t0 + (t1 - t0) * (n - n0) / (n1 - n0)


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
    """The largest k with oldest wait + backlog batches x service time <= margin x deadline."""

    profile: Profile
    deadline_ms: float
    max_batch: int
    margin: float = 0.9
    kind = "rule"

    def choose(self, state: QueueState) -> int:
        n = max(1, min(state.queued, self.max_batch))
        batches = max(1, math.ceil(state.queued / self.max_batch))
        for k in sorted(self.profile.ks, reverse=True):
            total = state.oldest_wait_ms + batches * self.profile.service_ms(k, n)
            if total <= self.margin * self.deadline_ms:
                return k
        return min(self.profile.ks)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "deadline_ms": self.deadline_ms, "margin": self.margin}


def bucket(state: QueueState, deadline_ms: float) -> tuple[int, int]:
    q = bisect.bisect_left(QUEUE_BUCKETS, state.queued)
    w = bisect.bisect_left(WAIT_BUCKETS, state.oldest_wait_ms / max(deadline_ms, 1e-9))
    return q, w


@dataclass
class LearnedPolicy(Policy):
    """Greedy in a Q-table over (queue bucket, wait bucket) x k."""

    ks: list[int]
    deadline_ms: float
    q: list[list[list[float]]]  # [queue bucket][wait bucket][action]
    trained: dict[str, Any] = field(default_factory=dict)
    kind = "learned"

    def choose(self, state: QueueState) -> int:
        qb, wb = bucket(state, self.deadline_ms)
        values = self.q[qb][wb]
        return self.ks[max(range(len(values)), key=lambda a: (values[a], self.ks[a]))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ks": self.ks,
            "deadline_ms": self.deadline_ms,
            "q": self.q,
            "trained": self.trained,
        }


# ----------------------------------------------------------------------------- simulation


@dataclass
class SimResult:
    requests: int
    answered_in_time: int
    mean_utility: float
    mean_k: float
    p50_ms: float
    p99_ms: float

    @property
    def miss_rate(self) -> float:
        return 1.0 - self.answered_in_time / max(self.requests, 1)


def arrivals(rate: float, duration_s: float, rng: random.Random, pattern: str = "poisson"):
    """Arrival times (ms): Poisson at `rate`, or bursty (on/off: 2 x rate for 1 s, then 0.25 x
    rate... averaging ~rate)."""
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
    seed: int = 0,
    pattern: str = "poisson",
    learn: LearnedPolicy | None = None,
    epsilon: float = 0.0,
    alpha: float = 0.1,
    gamma: float = 0.9,
) -> SimResult:
    """The server as a queue (one batch at a time, up to max_batch requests, service time from
    the profile); with `learn`, Q-learning updates of its table along the way."""
    rng = random.Random(seed)
    times = arrivals(rate, duration_s, rng, pattern)
    latencies, utilities, ks = [], [], []
    i, now, queue = 0, 0.0, []
    previous: tuple[tuple[int, int], int, float] | None = None
    while i < len(times) or queue:
        if not queue:
            now = max(now, times[i])
        while i < len(times) and times[i] <= now:
            queue.append(times[i])
            i += 1
        state = QueueState(len(queue), now - queue[0], rate)
        cell = bucket(state, deadline_ms)
        if learn is not None and previous is not None:
            (pq, pw), pa, reward = previous
            target = reward + gamma * max(learn.q[cell[0]][cell[1]])
            learn.q[pq][pw][pa] += alpha * (target - learn.q[pq][pw][pa])
        if learn is not None and rng.random() < epsilon:
            k = rng.choice(profile.ks)
        else:
            k = policy.choose(state)
        batch, queue = queue[:max_batch], queue[max_batch:]
        now += profile.service_ms(k, len(batch))
        quality = profile.quality[str(k)]
        reward = 0.0
        for arrived in batch:
            latency = now - arrived
            latencies.append(latency)
            utility = quality if latency <= deadline_ms else 0.0
            utilities.append(utility)
            reward += utility
            ks.append(k)
        if learn is not None:
            previous = (cell, profile.ks.index(k), reward)
    if learn is not None and previous is not None:
        (pq, pw), pa, reward = previous
        learn.q[pq][pw][pa] += alpha * (reward - learn.q[pq][pw][pa])
    latencies.sort()
    n = len(latencies)

    def pct(p: float) -> float:
        return latencies[min(n - 1, int(p * n))] if n else 0.0

    return SimResult(
        n,
        sum(1 for lat in latencies if lat <= deadline_ms),
        sum(utilities) / max(n, 1),
        sum(ks) / max(n, 1),
        pct(0.5),
        pct(0.99),
    )


def train_learned(
    profile: Profile,
    *,
    deadline_ms: float,
    max_batch: int,
    rates: list[float],
    episodes: int = 2000,
    duration_s: float = 30.0,
    seed: int = 0,
) -> LearnedPolicy:
    """Q-learning over episodes at the given arrival rates (each episode one rate, Poisson or
    bursty at random), epsilon-greedy from 0.3 down to 0.02; the table starts from the static
    quality of each k (optimistic for large k, so that the learner must find where they fail)."""
    rng = random.Random(seed)
    q = [
        [
            [profile.quality[str(k)] * max_batch for k in profile.ks]
            for _ in range(len(WAIT_BUCKETS) + 1)
        ]
        for _ in range(len(QUEUE_BUCKETS) + 1)
    ]
    policy = LearnedPolicy(list(profile.ks), deadline_ms, q)
    start = time.perf_counter()
    for episode in range(episodes):
        epsilon = 0.3 + (0.02 - 0.3) * episode / max(episodes - 1, 1)
        simulate(
            policy,
            profile,
            rate=rng.choice(rates),
            duration_s=duration_s,
            deadline_ms=deadline_ms,
            max_batch=max_batch,
            seed=rng.randrange(1 << 30),
            pattern=rng.choice(("poisson", "bursty")),
            learn=policy,
            epsilon=epsilon,
        )
    policy.trained = {
        "episodes": episodes,
        "rates": rates,
        "duration_s": duration_s,
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
    ks = data["policy"].get("ks", profile.ks) if kind == "learned" else profile.ks
    bad = [k for k in {*profile.ks, *ks} if not 1 <= k <= num_experts]
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
    return LearnedPolicy(stored["ks"], stored["deadline_ms"], stored["q"], stored["trained"])
