"""k chosen per token and per input at inference, each policy a cost-quality sweep scored by AIQ.

`hyperrouter adaptive RUN` evaluates a trained language model (with recurrence memory, as
`hyperrouter eval` does) at:

- static k: every k of `ks` (the reference curve);
- per token (`hyperrouter.moe.policies`): top-p over p, weight-ratio skipping over r, with k_max;
- per input, an input being one batch column's segment of tgt_len tokens:
  - `oracle`: for each input, the cheapest k whose loss on it is within `tolerance` (nats per
    token) of the largest k's loss on it. An upper bound, not deployable: it needs every k's loss
    on the input, which it reads from the static runs (each input's context, the memory, is then
    the one the static run at that k computed). Its cost is the chosen k's only.
  - `predictor`: a multinomial logistic regression fitted on the validation split's inputs to
    the oracle's choice (at the same tolerance), from features known before the input is run:
    the same column's previous segment's mean loss, mean routing entropy and mean top-1 routing
    probability of the first MoE layer (all produced by the previous forward, so free). Run for
    real on the evaluated split: every batch's columns are grouped by their predicted k and each
    group runs at its k with its own memory. Cost: the chosen k's, plus the regression's
    multiply-adds.
  - `cascade`: run every input at a small k; where the model's confidence (the mean over the
    input's tokens of the largest next-token probability, no target needed) is below a
    threshold, run the input again at a large k from the same memory and keep that answer. The
    thresholds are the validation split's confidence quantiles that escalate the requested
    shares. Cost: the small k for every input plus the large k for the escalated ones.

Quality is minus the metric (BPC or perplexity), cost the analytic multiply-adds per token
(`hyperrouter.cost`, at each layer's mean k; the policies' element-wise work, such as top-p's
softmax and sort over E, is not a multiply-add) and the measured milliseconds per 1,000 tokens.
Each policy's AIQ (`hyperrouter.analysis.aiq`) is computed over the static curve's cost range,
alone and together with the static points (what a user who may also pick a static k gets); the
gain over static is the latter minus the static AIQ.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hyperrouter.analysis.aiq import aiq
from hyperrouter.cost import Shape, macs_per_token
from hyperrouter.data.iterators import LMOrderedIterator
from hyperrouter.errors import HyperRouterError
from hyperrouter.models.transformer_xl import TransformerXL
from hyperrouter.moe.policies import TokenPolicy, TopP, WeightRatio
from hyperrouter.train.config import RunConfig
from hyperrouter.train.evaluate import autocast, eval_mem_len, metric_value

PER_INPUT = ("oracle", "predictor", "cascade")
FEATURES = ("previous loss", "previous routing entropy", "previous top-1 routing probability")


@dataclass
class Pass:
    """One pass over a split: per input (segment i, column c) its mean loss [N, B] and the
    features the predictor and the cascade read; total time and tokens."""

    loss: Tensor  # [segments, columns] mean NLL (nats/token)
    entropy: Tensor  # [segments, columns] first MoE layer's mean routing entropy
    top1: Tensor  # [segments, columns] first MoE layer's mean top-1 routing probability
    confidence: Tensor | None  # [segments, columns] mean max next-token probability
    tokens: Tensor  # [segments] tokens per column of each segment
    seconds: float
    mean_k: list[float]  # per MoE layer, over every token

    @property
    def ms_per_1000_tokens(self) -> float:
        return 1e6 * self.seconds / max(float(self.tokens.sum()) * self.loss.shape[1], 1.0)

    @property
    def nll(self) -> float:
        weights = self.tokens[:, None].expand_as(self.loss).double()
        return float((self.loss.double() * weights).sum() / weights.sum())


@contextlib.contextmanager
def _inference(model: TransformerXL, mem_len: int) -> Iterator[None]:
    was_training, old_mem, old_k = model.training, model.mem_len, model.top_k
    old_policy = [layer.token_policy for layer in model.moe_layers()]
    model.eval()
    model.mem_len = mem_len
    try:
        with torch.no_grad():
            yield
    finally:
        model.mem_len = old_mem
        if old_k is not None:
            model.set_top_k(old_k)
        for layer, policy in zip(model.moe_layers(), old_policy):
            layer.token_policy = policy
        model.train(was_training)


def _routing_features(moe_outputs, qlen: int, columns: int) -> tuple[Tensor, Tensor]:
    """Per column: the first MoE layer's mean routing entropy and mean top-1 probability."""
    if not moe_outputs or moe_outputs[0].routing.logits is None:
        zeros = torch.zeros(columns)
        return zeros, zeros
    logits = moe_outputs[0].routing.logits.float()
    log_p = torch.log_softmax(logits, dim=-1).view(qlen, columns, -1)
    entropy = -(log_p.exp() * log_p).sum(-1).mean(0)
    top1 = log_p.max(-1).values.exp().mean(0)
    return entropy.cpu(), top1.cpu()


def _forward(model: TransformerXL, inp: Tensor, target: Tensor, mems, confidence: bool):
    """(nll [q, B], new memory, the MoE layers' outputs, confidence [B] or None): with
    `confidence`, the mean over each column's tokens of the largest next-token probability."""
    if not confidence:
        out = model(inp, target, mems)
        return out.nll, out.mems, out.moe_outputs, None
    hidden, new_mems, _, outs = model.body(inp, mems)
    pred = hidden[-target.shape[0] :]
    log_probs = model.crit.log_prob(pred.reshape(-1, pred.shape[-1])).float()
    nll = -log_probs.gather(1, target.reshape(-1, 1)).view(target.shape)
    conf = log_probs.max(-1).values.exp().view(target.shape).mean(0)
    return nll, new_mems, outs, conf


class _Tally:
    """What a pass collects batch by batch: each input's mean loss, the routing features (when
    asked), the experts computed per MoE layer, and the time from `start` to `finish`."""

    def __init__(
        self,
        model: TransformerXL,
        data: Tensor,
        config: RunConfig,
        device: torch.device,
        max_batches: int | None,
    ) -> None:
        self.columns = config.eval.batch_size
        self.iterator = LMOrderedIterator(data, self.columns, config.eval.tgt_len, device=device)
        n = len(self.iterator)
        self.n = n if max_batches is None else min(n, max_batches)
        self.loss: list[Tensor] = []
        self.entropy: list[Tensor] = []
        self.top1: list[Tensor] = []
        self.confidence: list[Tensor] = []
        self.tokens: list[int] = []
        self.pairs = [0.0] * len(model.moe_layers())  # (token, expert) pairs computed, per layer
        self.started = 0.0

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.started = time.perf_counter()
        for i in range(self.n):
            inp, target, _ = self.iterator.get_batch(i)
            yield inp, target

    def add(self, nll_QB: Tensor) -> None:
        self.loss.append(nll_QB.float().mean(0).cpu())
        self.tokens.append(nll_QB.shape[0])

    def count(self, mean_k: list[float], tokens: int) -> None:
        """One call's experts per token (per MoE layer) over `tokens` tokens."""
        for j, value in enumerate(mean_k):
            self.pairs[j] += value * tokens

    def finish(self) -> Pass:
        seconds = time.perf_counter() - self.started
        total = max(sum(self.tokens) * self.columns, 1)
        empty = torch.zeros(len(self.loss), self.columns)
        return Pass(
            torch.stack(self.loss),
            torch.stack(self.entropy) if self.entropy else empty,
            torch.stack(self.top1) if self.top1 else empty,
            torch.stack(self.confidence) if self.confidence else None,
            torch.tensor(self.tokens),
            seconds,
            [p / total for p in self.pairs],
        )


def _mean_k(outs) -> list[float]:
    return [o.stats.mean_k.item() for o in outs]


def run_pass(
    model: TransformerXL,
    data: Tensor,
    config: RunConfig,
    device: torch.device,
    *,
    k: int | None = None,
    policy: TokenPolicy | None = None,
    confidence: bool = False,
    features: bool = False,
    max_batches: int | None = None,
    on_batch: Callable[[], None] | None = None,
) -> Pass:
    """Every segment at static k (or under a per-token policy), with memory; the predictor's
    routing features and the cascade's confidence only when asked (they cost time)."""
    tally = _Tally(model, data, config, device, max_batches)
    mems: list[Tensor] = []
    with _inference(model, eval_mem_len(config)):
        if k is not None and model.moe_layers():
            model.set_top_k(k)
        if model.moe_layers():
            model.set_token_policy(policy)
        for inp, target in tally.batches():
            with autocast(device, config.train.amp):
                nll, mems, outs, c = _forward(model, inp, target, mems, confidence)
            tally.add(nll)
            if features:
                e, t1 = _routing_features(outs, inp.shape[0], inp.shape[1])
                tally.entropy.append(e)
                tally.top1.append(t1)
            if c is not None:
                tally.confidence.append(c.cpu())
            tally.count(_mean_k(outs), target.numel())
            if on_batch is not None:
                on_batch()
        return tally.finish()


# ----------------------------------------------------------------------------- per input


def oracle_choice(losses: Tensor, ks: list[int], tolerance: float) -> Tensor:
    """Per input, the index into `ks` (sorted) of the cheapest k whose loss is within
    `tolerance` of the largest k's: losses [len(ks), segments, columns] -> [segments, columns]."""
    if tolerance < 0:
        raise HyperRouterError(f"tolerance must be >= 0 nats per token, got {tolerance}")
    within = losses <= losses[-1] + tolerance
    # argmax of a bool over the first axis: the first (cheapest) True; the largest k always is
    return within.to(torch.uint8).argmax(0)


def _k_share(pick: Tensor, ks: list[int]) -> Tensor:
    """The share of inputs given each k (pick: indices into ks)."""
    counts = torch.bincount(pick.reshape(-1), minlength=len(ks)).double()
    return counts / counts.sum()


def _features(previous_loss: Tensor, entropy: Tensor, top1: Tensor) -> Tensor:
    return torch.stack([previous_loss, entropy, top1], -1).float()


class KPredictor:
    """A multinomial logistic regression from the input's features to the index of its k."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.mean = torch.zeros(len(FEATURES))
        self.std = torch.ones(len(FEATURES))
        self.weight = torch.zeros(len(FEATURES), num_classes)
        self.bias = torch.zeros(num_classes)

    @property
    def macs(self) -> int:
        """Multiply-adds of one prediction."""
        return len(FEATURES) * (self.num_classes + 1)

    def fit(self, x: Tensor, y: Tensor, weight_decay: float = 1e-3) -> KPredictor:
        self.mean = x.mean(0)
        self.std = x.std(0).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones(x.shape[1])
        z = (x - self.mean) / self.std
        w = torch.zeros(x.shape[1], self.num_classes, requires_grad=True)
        b = torch.zeros(self.num_classes, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(z @ w + b, y) + weight_decay * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.weight, self.bias = w.detach(), b.detach()
        return self

    def predict(self, x: Tensor) -> Tensor:
        return (((x - self.mean) / self.std) @ self.weight + self.bias).argmax(-1)


def _run_columns(
    model: TransformerXL,
    inp: Tensor,
    target: Tensor,
    mems: list[Tensor],
    k_of_column: Tensor,
    ks: list[int],
    amp: str,
) -> tuple[Tensor, list[Tensor], Any]:
    """One batch with each column at its own k (columns grouped by k, one forward per group):
    (nll [q, B], the new memory, (routing entropy [B], top-1 probability [B], mean k per MoE
    layer over the batch's tokens))."""
    device = inp.device
    nll = torch.empty(target.shape, dtype=torch.float32, device=device)
    entropy = torch.empty(inp.shape[1])
    top1 = torch.empty(inp.shape[1])
    new_mems: list[Tensor | None] = []
    k_pairs = [0.0] * len(model.moe_layers())
    for index in k_of_column.unique().tolist():
        cols = (k_of_column == index).nonzero(as_tuple=True)[0].to(device)
        model.set_top_k(ks[index])
        sub = [m.index_select(1, cols) for m in mems]
        with autocast(device, amp):
            out = model(inp.index_select(1, cols), target.index_select(1, cols), sub)
        nll[:, cols] = out.nll.float()
        e, t1 = _routing_features(out.moe_outputs, inp.shape[0], len(cols))
        entropy[cols.cpu()], top1[cols.cpu()] = e, t1
        if not new_mems:
            new_mems = [None] * len(out.mems)
        for j, m in enumerate(out.mems):
            if new_mems[j] is None:
                new_mems[j] = m.new_empty(m.shape[0], inp.shape[1], m.shape[2])
            new_mems[j][:, cols] = m
        for j, stats in enumerate(out.moe_stats):
            k_pairs[j] += stats.mean_k.item() * len(cols)
    return nll, new_mems, (entropy, top1, [p / inp.shape[1] for p in k_pairs])


def run_predictor(
    model: TransformerXL,
    data: Tensor,
    config: RunConfig,
    device: torch.device,
    predictor: KPredictor,
    ks: list[int],
    *,
    max_batches: int | None = None,
    on_batch: Callable[[], None] | None = None,
) -> tuple[Pass, Tensor]:
    """The predictor run for real: (the pass, the chosen index into ks [segments, columns])."""
    tally = _Tally(model, data, config, device, max_batches)
    chosen = []
    mems: list[Tensor] = []
    with _inference(model, eval_mem_len(config)):
        model.set_token_policy(None)
        for inp, target in tally.batches():
            if not tally.loss:  # nothing known yet: the largest k
                pick = torch.full((tally.columns,), len(ks) - 1, dtype=torch.long)
            else:
                pick = predictor.predict(
                    _features(tally.loss[-1], tally.entropy[-1], tally.top1[-1])
                )
            nll, mems, (e, t1, mean_k) = _run_columns(
                model, inp, target, mems, pick, ks, config.train.amp
            )
            tally.add(nll)
            tally.entropy.append(e)
            tally.top1.append(t1)
            tally.count(mean_k, target.numel())
            chosen.append(pick)
            if on_batch is not None:
                on_batch()
        return tally.finish(), torch.stack(chosen)


def run_cascade(
    model: TransformerXL,
    data: Tensor,
    config: RunConfig,
    device: torch.device,
    small: int,
    large: int,
    threshold: float,
    *,
    max_batches: int | None = None,
    on_batch: Callable[[], None] | None = None,
) -> tuple[Pass, float]:
    """Every input at k = small; the inputs whose confidence is below `threshold` again at k =
    large from the same memory. (the pass, the share of inputs escalated)."""
    tally = _Tally(model, data, config, device, max_batches)
    escalated = 0
    mems: list[Tensor] = []
    with _inference(model, eval_mem_len(config)):
        model.set_token_policy(None)
        for inp, target in tally.batches():
            model.set_top_k(small)
            with autocast(device, config.train.amp):
                nll, new_mems, outs, conf = _forward(model, inp, target, mems, True)
            nll = nll.float()
            tally.count(_mean_k(outs), target.numel())
            cols = (conf < threshold).nonzero(as_tuple=True)[0]
            if len(cols):
                model.set_top_k(large)
                sub = [m.index_select(1, cols) for m in mems]
                with autocast(device, config.train.amp):
                    again = model(inp.index_select(1, cols), target.index_select(1, cols), sub)
                nll[:, cols] = again.nll.float()
                for m, m_large in zip(new_mems, again.mems):
                    m[:, cols] = m_large
                tally.count(_mean_k(again.moe_outputs), target.shape[0] * len(cols))
            mems = new_mems
            escalated += len(cols)
            tally.add(nll)
            if on_batch is not None:
                on_batch()
        return tally.finish(), escalated / max(tally.columns * len(tally.loss), 1)


# ----------------------------------------------------------------------------- the sweep


@dataclass
class SweepSpec:
    """What `adaptive_sweep` evaluates (see the module docstring)."""

    ks: list[int]
    top_ps: list[float]
    ratios: list[float]
    k_max: int | None
    per_input: list[str]
    tolerances: list[float]
    cascade_ks: tuple[int, int]
    escalate: list[float]


def _point(
    model: TransformerXL,
    shape: Shape,
    kind: str,
    result: Pass,
    extra_macs: float = 0.0,
    macs: float | None = None,
) -> dict[str, Any]:
    if macs is None:
        mean_k = result.mean_k if result.mean_k else None
        macs = sum(macs_per_token(model, shape, mean_k).values())
    macs += extra_macs
    return {
        "value": metric_value(result.nll, kind),
        "mean_k": round(sum(result.mean_k) / len(result.mean_k), 4) if result.mean_k else None,
        "macs_per_token": round(macs, 1),
        "ms_per_1000_tokens": round(result.ms_per_1000_tokens, 4),
    }


def _aiq_block(static: list[dict], points: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for by, key in (("by_macs", "macs_per_token"), ("by_time", "ms_per_1000_tokens")):
        lo = min(p[key] for p in static)
        hi = max(p[key] for p in static)

        def pts(rows, key=key):
            return [(p[key], -p["value"]) for p in rows]

        out[f"static_{by}"] = aiq(pts(static), lo, hi)
        if points:
            out[f"alone_{by}"] = aiq(pts(points), lo, hi)
            out[f"with_static_{by}"] = aiq(pts(static) + pts(points), lo, hi)
            out[f"gain_{by}"] = out[f"with_static_{by}"] - out[f"static_{by}"]
    return out


def adaptive_sweep(
    model: TransformerXL,
    config: RunConfig,
    kind: str,
    valid: Tensor,
    test: Tensor,
    spec: SweepSpec,
    device: torch.device,
    *,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Static k, the per-token policies and the per-input policies on `test` (the predictor and
    the cascade's thresholds fitted on `valid`); a dict for adaptive.json."""
    from tqdm.auto import tqdm

    if not model.moe_layers():
        raise HyperRouterError("adaptive k needs a model with MoE layers; this one is dense")
    ks = sorted(set(spec.ks))
    shape = Shape(config.eval.tgt_len, eval_mem_len(config), config.eval.batch_size)
    batches = len(LMOrderedIterator(test, config.eval.batch_size, config.eval.tgt_len))
    if max_batches is not None:
        batches = min(batches, max_batches)
    bar = tqdm(desc="adaptive", unit="batch", disable=not progress, leave=False)
    tick = lambda: bar.update(1)  # noqa: E731
    out: dict[str, Any] = {"metric": "bpc" if kind == "char" else "ppl", "ks": ks}
    try:
        bar.set_postfix_str("warm-up")
        for k in ks:  # untimed: the first calls at a shape pay allocation and one-time setup
            run_pass(model, test, config, device, k=k, confidence=True, max_batches=2)
        static_runs = {}
        for k in ks:
            bar.set_postfix_str(f"static k={k}")
            static_runs[k] = run_pass(
                model,
                test,
                config,
                device,
                k=k,
                confidence=False,
                max_batches=max_batches,
                on_batch=tick,
            )
        static = [{"k": k, **_point(model, shape, kind, static_runs[k])} for k in ks]
        out["static"] = static
        policies: dict[str, list[dict]] = {}
        for name, values, make in (
            ("top_p", spec.top_ps, lambda v: TopP(k_max=spec.k_max, p=v)),
            ("ratio", spec.ratios, lambda v: WeightRatio(k_max=spec.k_max, r=v)),
        ):
            rows = []
            for value in values:
                bar.set_postfix_str(f"{name}={value:g}")
                result = run_pass(
                    model,
                    test,
                    config,
                    device,
                    policy=make(value),
                    max_batches=max_batches,
                    on_batch=tick,
                )
                rows.append({"param": value, **_point(model, shape, kind, result)})
            if rows:
                policies[name] = rows
        if spec.per_input:
            policies.update(
                _per_input(
                    model,
                    config,
                    kind,
                    valid,
                    test,
                    spec,
                    ks,
                    static_runs,
                    shape,
                    device,
                    max_batches,
                    tick,
                    bar,
                )
            )
        out["policies"] = policies
        out["aiq"] = {name: _aiq_block(static, rows) for name, rows in policies.items()}
        out["aiq"]["static"] = _aiq_block(static, [])
        out["shape"] = {"tgt_len": shape.qlen, "mem_len": shape.mlen, "batch": shape.batch}
        out["batches"] = batches
    finally:
        bar.close()
    return out


def _per_input(
    model,
    config,
    kind,
    valid,
    test,
    spec,
    ks,
    static_runs,
    shape,
    device,
    max_batches,
    tick,
    bar,
) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    macs_k = {k: sum(macs_per_token(model, shape, k).values()) for k in {*ks, *spec.cascade_ks}}
    ms_k = {k: r.ms_per_1000_tokens for k, r in static_runs.items()}
    losses = torch.stack([static_runs[k].loss for k in ks])
    weights = static_runs[ks[-1]].tokens[:, None].double()
    if "oracle" in spec.per_input:
        rows = []
        for tol in spec.tolerances:
            pick = oracle_choice(losses, ks, tol)
            loss = losses.gather(0, pick[None]).squeeze(0).double()
            nll = float((loss * weights).sum() / (weights.sum() * loss.shape[1]))
            share = _k_share(pick, ks)
            rows.append(
                {
                    "param": tol,
                    "value": metric_value(nll, kind),
                    "mean_k": round(float(sum(s * k for s, k in zip(share.tolist(), ks))), 4),
                    "macs_per_token": round(
                        float(sum(s * macs_k[k] for s, k in zip(share, ks))), 1
                    ),
                    "ms_per_1000_tokens": round(
                        float(sum(s * ms_k[k] for s, k in zip(share, ks))), 4
                    ),
                    "k_share": {str(k): round(float(v), 4) for k, v in zip(ks, share)},
                }
            )
        out["oracle"] = rows
    needs_valid = {"predictor", "cascade"} & set(spec.per_input)
    valid_runs = {}
    if needs_valid:
        small, large = spec.cascade_ks
        wanted = (set(ks) if "predictor" in spec.per_input else set()) | {small}
        for k in sorted(wanted):
            bar.set_postfix_str(f"validation k={k}")
            valid_runs[k] = run_pass(
                model,
                valid,
                config,
                device,
                k=k,
                confidence=k == small,
                features=k == ks[-1],
                max_batches=max_batches,
                on_batch=tick,
            )
    if "predictor" in spec.per_input:
        v_losses = torch.stack([valid_runs[k].loss for k in ks])
        ref = valid_runs[ks[-1]]
        rows = []
        for tol in spec.tolerances:
            labels = oracle_choice(v_losses, ks, tol)[1:].reshape(-1)
            x = _features(ref.loss[:-1], ref.entropy[:-1], ref.top1[:-1]).reshape(-1, 3)
            predictor = KPredictor(len(ks))
            if labels.numel() and labels.unique().numel() > 1:
                predictor.fit(x, labels)
            else:  # one class in the labels: always that k
                predictor.bias[int(labels[0]) if labels.numel() else len(ks) - 1] = 1.0
            bar.set_postfix_str(f"predictor tol={tol:g}")
            result, pick = run_predictor(
                model,
                test,
                config,
                device,
                predictor,
                ks,
                max_batches=max_batches,
                on_batch=tick,
            )
            share = _k_share(pick, ks)
            extra = predictor.macs / config.eval.tgt_len
            rows.append(
                {
                    "param": tol,
                    **_point(model, shape, kind, result, extra),
                    "k_share": {str(k): round(float(v), 4) for k, v in zip(ks, share)},
                }
            )
        out["predictor"] = rows
    if "cascade" in spec.per_input:
        small, large = spec.cascade_ks
        conf = valid_runs[small].confidence.reshape(-1)
        rows = []
        for share in spec.escalate:
            threshold = float(torch.quantile(conf.double(), share)) if share > 0 else -math.inf
            if share >= 1:
                threshold = math.inf
            bar.set_postfix_str(f"cascade {small}->{large} {share:g}")
            result, escalated = run_cascade(
                model,
                test,
                config,
                device,
                small,
                large,
                threshold,
                max_batches=max_batches,
                on_batch=tick,
            )
            # every input pays the whole model at the small k, escalated ones again at the large
            macs = macs_k[small] + escalated * macs_k[large]
            rows.append(
                {
                    "param": share,
                    "threshold": threshold if math.isfinite(threshold) else None,
                    "escalated": round(escalated, 4),
                    **_point(model, shape, kind, result, macs=macs),
                }
            )
        out["cascade"] = rows
    return out


def format_report(result: dict[str, Any]) -> str:
    """The sweep as a table (one row per operating point) and each policy's AIQ."""
    metric = result["metric"]
    lines = [
        f"{'policy':<10} {'param':>8} {metric:>8} {'mean k':>7} {'MACs/token':>12} "
        f"{'ms/1k tok':>10}"
    ]
    rows = [("static", r["k"], r) for r in result["static"]]
    for name, points in result.get("policies", {}).items():
        rows += [(name, p["param"], p) for p in points]
    for name, param, r in rows:
        mean_k = "-" if r.get("mean_k") is None else f"{r['mean_k']:.2f}"
        lines.append(
            f"{name:<10} {param:>8g} {r['value']:>8.4f} {mean_k:>7} "
            f"{r['macs_per_token']:>12,.0f} {r['ms_per_1000_tokens']:>10.2f}"
        )
    lines.append("")
    lines.append(
        f"AIQ (quality = -{metric}) over the static cost range; gain = AIQ(static + policy) - "
        f"AIQ(static)"
    )
    lines.append(f"{'policy':<10} {'by MACs':>9} {'gain':>8} {'by time':>9} {'gain':>8}")
    for name, block in result.get("aiq", {}).items():
        if name == "static":
            macs, ms = block["static_by_macs"], block["static_by_time"]
            lines.append(f"{name:<10} {macs:>9.4f} {'':>8} {ms:>9.4f}")
            continue
        lines.append(
            f"{name:<10} {block['alone_by_macs']:>9.4f} {block['gain_by_macs']:>+8.4f} "
            f"{block['alone_by_time']:>9.4f} {block['gain_by_time']:>+8.4f}"
        )
    return "\n".join(lines)
