"""Evaluation: BPC / perplexity / bits per byte of a language model at any number of experts, and
loading a trained checkpoint back for `hyperrouter eval`, `compare` and `analyze`.

The metric follows the corpus kind: bits per character (`bpc`, char), perplexity (`ppl`, word),
and for sub-word corpora (bpe) bits per byte (`bpb` = the total NLL in bits / the UTF-8 bytes of
the evaluated target tokens), which compares with a character model's BPC on the same text; bpe
evaluations report the token perplexity (`ppl`) beside it (`record_metrics`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hyperrouter.data.corpus import Corpus, load_corpus
from hyperrouter.data.iterators import LMOrderedIterator
from hyperrouter.data.vocab import Vocab
from hyperrouter.distributed import all_reduce_sum
from hyperrouter.errors import HyperRouterError
from hyperrouter.models.transformer_xl import TransformerXL
from hyperrouter.train import checkpoint as ckpt
from hyperrouter.train.config import RunConfig, check_top_ks, config_from_dict


def metric_name(kind: str) -> str:
    """bpc for character corpora, bpb for sub-word (bpe) corpora, ppl for word corpora."""
    return {"char": "bpc", "bpe": "bpb"}.get(kind, "ppl")


def metric_value(loss: float, kind: str, bytes_per_token: float | None = None) -> float:
    """BPC = loss / ln 2 (nats per character to bits); BPB = loss / ln 2 / the evaluated text's
    UTF-8 bytes per token (bpe; needs `bytes_per_token`); perplexity = exp(loss)."""
    if kind == "bpe":
        if not bytes_per_token:
            raise HyperRouterError("bits per byte needs the bytes per token of the evaluated text")
        return loss / math.log(2) / bytes_per_token
    return loss / math.log(2) if kind == "char" else math.exp(min(loss, 700.0))


def record_metrics(result: EvalResult, kind: str) -> dict[str, float]:
    """The metric values of one evaluation by name: {"bpc"} (char), {"ppl"} (word), {"bpb",
    "ppl"} (bpe: bits per byte, and the token perplexity)."""
    main = metric_value(result.loss, kind, result.bytes_per_token)
    if kind != "bpe":
        return {metric_name(kind): main}
    return {"bpb": main, "ppl": metric_value(result.loss, "word")}


def token_byte_lengths(vocab: Vocab) -> Tensor | None:
    """UTF-8 bytes of each token id of a bpe vocabulary (None for char and word ones)."""
    lengths = vocab.token_bytes
    return None if lengths is None else torch.from_numpy(lengths)


def bytes_per_token(vocab: Vocab, tokens: Tensor) -> float | None:
    """Mean UTF-8 bytes of the tokens `tokens` of a bpe vocabulary (None for char and word)."""
    lengths = token_byte_lengths(vocab)
    if lengths is None or tokens.numel() == 0:
        return None
    counts = torch.bincount(tokens.reshape(-1).long().cpu(), minlength=len(lengths))
    return float((counts * lengths).sum()) / tokens.numel()


def cost_and_aiq(
    model: TransformerXL,
    config: RunConfig,
    metric: str,
    by_k: dict[str, float],
    speed: dict[str, float],
    mean_k: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """Per k: the analytic multiply-adds per token of an evaluation segment and the measured
    milliseconds per 1,000 tokens; and RouterBench's AIQ of quality against each cost, quality
    being minus the metric (higher is better; `hyperrouter.analysis.aiq`). `mean_k` (per k, the
    FFN experts each MoE layer computed per token, measured) replaces k in the multiply-adds
    where given: routers and options whose tokens use fewer experts than k (top-p, ReMoE, null
    and zero-computation experts, capacity drops) are charged what they computed."""
    from hyperrouter.analysis.aiq import aiq
    from hyperrouter.cost import Shape, macs_per_token

    shape = Shape(config.eval.tgt_len, eval_mem_len(config), config.eval.batch_size)
    moe = bool(model.moe_layers())
    mean_k = mean_k or {}
    own = getattr(model, "macs_per_token", None)  # a model other than Transformer-XL counts its own
    count = own if own is not None else lambda *args: macs_per_token(model, *args)
    macs = {
        k: round(sum(count(shape, mean_k.get(k) or int(k) if moe else None).values()), 1)
        for k in by_k
    }
    ms = {k: round(1e6 / speed[k], 4) for k in by_k if speed.get(k)}
    points = {k: -value for k, value in by_k.items() if math.isfinite(value)}
    out: dict[str, Any] = {
        "cost": {"macs_per_token": macs, "ms_per_1000_tokens": ms},
        **({"mean_k": {k: mean_k[k] for k in by_k if k in mean_k}} if moe and mean_k else {}),
        "aiq": {"quality": f"-{metric}"},
    }
    if points:
        out["aiq"]["by_macs"] = aiq([(macs[k], q) for k, q in points.items()])
        if all(k in ms for k in points):
            out["aiq"]["by_time"] = aiq([(ms[k], q) for k, q in points.items()])
    return out


def lr_at(step: int, config: RunConfig) -> float:
    """Linear warmup, then cosine decay from lr to lr_min over all steps (reference schedule)."""
    t = config.train
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return t.lr * step / t.warmup_steps
    progress = min(step / t.steps, 1.0)
    return t.lr_min + (t.lr - t.lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HyperRouterError("train.device is cuda but CUDA is not available")
    return device


def autocast(device: torch.device, amp: str):
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


@dataclass
class EvalResult:
    """Mean NLL, tokens, seconds, per MoE layer the FFN experts computed per token, and the UTF-8
    bytes of the target tokens (when `evaluate` was given their lengths: bpe)."""

    loss: float
    tokens: int
    seconds: float
    mean_k: list[float] | None = None
    bytes: int | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def bytes_per_token(self) -> float | None:
        return None if self.bytes is None else self.bytes / max(self.tokens, 1)


@torch.no_grad()
def evaluate(
    model: TransformerXL,
    data: Tensor,
    *,
    batch_size: int,
    tgt_len: int,
    mem_len: int,
    top_k: int | None,
    device: torch.device,
    max_batches: int | None = None,
    amp: str = "none",
    on_batch=None,
    shard: tuple[int, int] | None = None,
    token_bytes: Tensor | None = None,
) -> EvalResult:
    """Mean NLL (nats/token) over `data` in order, with recurrence memory, at `top_k` experts.

    `token_bytes` ([V] UTF-8 bytes per token id, bpe) also counts the bytes of the target tokens
    (`EvalResult.bytes`, for bits per byte).

    `on_batch(output)` is called with every LMOutput (for routing statistics). `shard` = (rank,
    world size) splits the batch columns over the ranks of torch.distributed (every rank runs the
    same batches, on its own columns, with its own memory) and sums the loss over them: the result
    is the single-process one up to the order of the sums (and, for routers that decide over a
    whole call, such as expert choice, up to their per-call decisions).
    """
    was_training, old_k, old_mem = model.training, model.top_k, model.mem_len
    model.eval()
    model.mem_len = mem_len
    if top_k is not None and model.moe_layers():
        model.set_top_k(top_k)
    iterator = LMOrderedIterator(data, batch_size, tgt_len, device=device)
    columns = None
    if shard is not None and shard[1] > 1:
        rank, world = shard
        if batch_size < world:
            raise HyperRouterError(
                f"eval.batch_size {batch_size} is smaller than the {world} ranks: every rank "
                f"needs at least one column"
            )
        columns = torch.tensor_split(torch.arange(batch_size, device=device), world)[rank]
    total, count, mems = 0.0, 0, []
    nbytes = None
    if token_bytes is not None:
        token_bytes = token_bytes.to(device)
        nbytes = torch.zeros((), dtype=torch.long, device=device)
    routed = [0] * len(model.moe_layers())
    pairs = [torch.zeros((), dtype=torch.long, device=device) for _ in routed]
    start = time.perf_counter()
    try:
        for i in range(len(iterator)):
            if max_batches is not None and i >= max_batches:
                break
            inp, target, _ = iterator.get_batch(i)
            if columns is not None:
                inp, target = inp[:, columns], target[:, columns]
            with autocast(device, amp):
                out = model(inp, target, mems)
            mems = out.mems
            total += out.nll.double().sum().item()
            count += out.nll.numel()
            if nbytes is not None:
                nbytes += token_bytes[target].sum()
            for j, moe_out in enumerate(out.moe_outputs):
                pairs[j] = pairs[j] + moe_out.computed_pairs
                routed[j] += moe_out.routed_tokens
            if on_batch is not None:
                on_batch(out)
    finally:
        model.mem_len = old_mem
        if old_k is not None:
            model.set_top_k(old_k)
        model.train(was_training)
    if nbytes is not None:
        nbytes = int(nbytes)
    if columns is not None:
        sums = all_reduce_sum(
            torch.tensor(
                [total, float(count), float(nbytes or 0)], dtype=torch.float64, device=device
            )
        )
        total, count = float(sums[0]), int(sums[1])
        nbytes = None if nbytes is None else int(sums[2])
    seconds = time.perf_counter() - start
    mean_k = [float(p) / max(t, 1) for p, t in zip(pairs, routed)] if routed else None
    if mean_k is not None and columns is not None:
        sums = all_reduce_sum(
            torch.tensor([float(p) for p in pairs] + routed, dtype=torch.float64, device=device)
        )
        half = len(pairs)
        mean_k = [float(sums[j]) / max(float(sums[half + j]), 1.0) for j in range(half)]
    return EvalResult(total / max(count, 1), count, seconds, mean_k, nbytes)


def eval_mem_len(config: RunConfig) -> int:
    """Evaluation memory keeps the training context: mem_len + tgt_len - eval tgt_len (as the
    reference does)."""
    t = config.train
    if t.mem_len == 0:
        return 0
    return max(t.mem_len + t.tgt_len - config.eval.tgt_len, 0)


def inference_ks(model: TransformerXL, config: RunConfig) -> list[int]:
    """The k values evaluated at the end: eval.top_ks within [1, E] (just 1 for dense models)."""
    if not model.moe_layers():
        return [1]
    return sorted({k for k in config.eval.top_ks if 1 <= k <= model.num_experts})


@dataclass
class LoadedRun:
    """A trained model with what it needs: its config, vocabulary and corpus kind."""

    model: TransformerXL
    config: RunConfig
    vocab: Vocab
    kind: str
    folder: Path


def load_trained(
    path: str | Path, which: str = "best_all_experts", device: torch.device | None = None
) -> LoadedRun:
    """Rebuild the model saved in a run folder (or a checkpoint folder) and load its weights."""
    folder = ckpt.resolve_checkpoint(path, which)
    meta = ckpt.read_json(folder / ckpt.CONFIG_FILE)
    try:
        config = config_from_dict(meta["run"])
        n_token, kind = int(meta["n_token"]), meta["kind"]
    except (KeyError, TypeError, ValueError):
        raise HyperRouterError(f"{folder / ckpt.CONFIG_FILE} is not a hyperrouter config") from None
    vocab = Vocab.from_dict(ckpt.read_json(folder / ckpt.VOCAB_FILE))
    model = config.build_model(n_token)
    ckpt.load_weights(model, folder)
    device = device or pick_device(config.train.device)
    return LoadedRun(model.to(device), config, vocab, kind, folder)


def load_matching_corpus(run: LoadedRun, data: str | None) -> Corpus:
    """The corpus to evaluate on: `data` or the run's own, with the run's vocabulary."""
    path = data if data is not None else run.config.data.path
    tokenizer = run.vocab.tokenizer if run.kind == "bpe" else None
    corpus = load_corpus(path, kind=run.kind, tokenizer=tokenizer)
    if corpus.vocab != run.vocab:
        raise HyperRouterError(
            f"the data at {path or 'the built-in corpus'} has a different vocabulary than the "
            f"one {run.folder} was trained with"
        )
    return corpus


def evaluate_checkpoint(
    path: str | Path,
    *,
    top_ks: tuple[int, ...] | None = None,
    split: str = "test",
    data: str | None = None,
    which: str = "best_all_experts",
    progress: bool = False,
) -> dict[str, Any]:
    """`hyperrouter eval`: metric and tokens/s at each k; same layout as results.json."""
    run = load_trained(path, which)
    model, config = run.model, run.config
    if top_ks is None:
        ks = inference_ks(model, config)
    else:
        ks = list(top_ks)
        check_top_ks(ks, model.num_experts if model.moe_layers() else 1, "--top-k values")
    corpus = load_matching_corpus(run, data)
    device = next(model.parameters()).device
    metric = metric_name(run.kind)
    others: dict[str, dict[str, float]] = {}
    by_k, speed, mean_k = evaluate_at_ks(
        model,
        getattr(corpus, split),
        config,
        run.kind,
        ks,
        device,
        on_result=lambda k, result: secondary_metrics(others, k, result, run.kind),
        progress=progress,
        token_bytes=token_byte_lengths(run.vocab),
    )
    return {
        "metric": metric,
        "split": split,
        "by_top_k": by_k,
        **others,
        "tokens_per_second": speed,
        **cost_and_aiq(model, config, metric, by_k, speed, mean_k),
        "checkpoint": str(run.folder),
    }


def secondary_metrics(
    into: dict[str, dict[str, float]], k: int, result: EvalResult, kind: str
) -> None:
    """Add the metrics other than the main one (bpe: the perplexity) of the evaluation at `k` to
    `into` as `<name>_by_top_k` (results.json keys beside `by_top_k`)."""
    for name, value in record_metrics(result, kind).items():
        if name != metric_name(kind):
            into.setdefault(f"{name}_by_top_k", {})[str(k)] = value


def evaluate_at_ks(
    model: TransformerXL,
    data: Tensor,
    config: RunConfig,
    kind: str,
    ks: list[int],
    device: torch.device,
    on_result=None,
    progress: bool = False,
    shard: tuple[int, int] | None = None,
    token_bytes: Tensor | None = None,
) -> tuple[dict[str, float], dict[str, float], dict[str, list[float]]]:
    """BPC/perplexity, inference tokens/s and measured FFN experts per token of each MoE layer
    (`EvalResult.mean_k`) of `model` on `data` at every k (keys are str(k)).

    `on_result(k, EvalResult)` is called after each k (the trainer logs it). `progress` shows a
    bar over all k values and batches on stderr. `shard`, `token_bytes`: as in `evaluate`."""
    from tqdm.auto import tqdm

    batches = len(LMOrderedIterator(data, config.eval.batch_size, config.eval.tgt_len))
    bar = tqdm(
        total=len(ks) * batches, desc="evaluate", unit="batch", disable=not progress, leave=False
    )
    by_k, speed, mean_k = {}, {}, {}
    try:
        for k in ks:
            bar.set_postfix_str(f"k={k}")
            result = evaluate(
                model,
                data,
                batch_size=config.eval.batch_size,
                tgt_len=config.eval.tgt_len,
                mem_len=eval_mem_len(config),
                top_k=k if model.moe_layers() else None,
                device=device,
                amp=config.train.amp,
                on_batch=lambda _: bar.update(1),
                shard=shard,
                token_bytes=token_bytes,
            )
            by_k[str(k)] = metric_value(result.loss, kind, result.bytes_per_token)
            speed[str(k)] = result.tokens_per_second
            if result.mean_k is not None:
                mean_k[str(k)] = [round(v, 4) for v in result.mean_k]
            if on_result is not None:
                on_result(k, result)
    finally:
        bar.close()
    return by_k, speed, mean_k
