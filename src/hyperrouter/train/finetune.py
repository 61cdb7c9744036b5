"""`hyperrouter finetune`: classification on top of a pretrained LM run (paper Table 2).

text -> tokens (the pretrained byte vocabulary, or a new task word vocabulary with fresh
embeddings) -> truncated, right-padded batches -> Classifier(pretrained body incl. every router's
state; frozen router parts stay frozen) -> cross-entropy -> Adam -> checkpoint chosen on the
validation split (never the reported test split) -> test accuracy at every inference k.

Long documents (IMDB) keep their first and last max_len / 2 tokens (head + tail truncation).
`normalize: basic` lowercases the texts, turns HTML line breaks into spaces and splits punctuation
off words before tokenizing (SST is distributed that way already; IMDB and BANKING77 are raw).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from hyperrouter import distributed
from hyperrouter.data.tasks import TASKS, ClassificationSplit, TaskData, load_task
from hyperrouter.data.vocab import Vocab
from hyperrouter.errors import HyperRouterError
from hyperrouter.models.classifier import POOLINGS, Classifier
from hyperrouter.models.transformer_xl import ModelConfig, MoEConfig
from hyperrouter.moe.schedules import VALID_SCHEDULES, top_k_at
from hyperrouter.params import parameter_summary, trainable_parameters
from hyperrouter.train import checkpoint as ckpt
from hyperrouter.train import runlock
from hyperrouter.train.config import (
    EvalConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    check_top_ks,
    from_dict,
    load_raw,
)
from hyperrouter.train.evaluate import load_trained, pick_device
from hyperrouter.train.step import ChunkResult, training_step

TOKENIZERS = ("auto", "char", "word", "bpe")


@dataclass
class FinetuneConfig:
    """Fine-tuning hyperparameters (reference train_sst2.py: lr 1e-4, 5000 steps, batch 16,
    k fixed at 16, head on the last token). model/moe describe the from-scratch control only."""

    name: str = "custom"
    description: str = ""
    task: str = "sst2"
    data: str | None = None
    tokenizer: str = "auto"
    max_len: int = 256
    pooling: str = "last"
    head_dropout: float = 0.1
    steps: int = 5000
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 1e-4
    clip: float = 0.25
    weight_decay: float = 0.0
    seed: int = 1111
    top_k_schedule: str = "constant"
    top_k_min: int = 16
    top_k_max: int = 16
    eval_interval: int = 500
    log_interval: int = 50
    valid_fraction: float = 0.1
    max_examples: int | None = None
    max_test_examples: int | None = None
    normalize: str = "none"
    min_word_freq: int = 1
    test_top_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def validate(self) -> FinetuneConfig:
        if self.task not in TASKS:
            raise HyperRouterError(f"unknown task {self.task!r}; valid: {', '.join(TASKS)}")
        if self.tokenizer not in TOKENIZERS:
            raise HyperRouterError(
                f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}"
            )
        if self.normalize not in NORMALIZERS:
            raise HyperRouterError(
                f"normalize must be one of {', '.join(NORMALIZERS)}, got {self.normalize!r}"
            )
        if self.min_word_freq < 1:
            raise HyperRouterError(f"min_word_freq must be >= 1, got {self.min_word_freq}")
        if self.pooling not in POOLINGS:
            raise HyperRouterError(f"pooling must be one of {', '.join(POOLINGS)}")
        if self.top_k_schedule not in VALID_SCHEDULES:
            raise HyperRouterError(
                f"unknown top_k_schedule {self.top_k_schedule!r}; "
                f"valid: {', '.join(VALID_SCHEDULES)}"
            )
        for name in ("max_len", "steps", "batch_size", "eval_batch_size", "eval_interval"):
            if getattr(self, name) < 1:
                raise HyperRouterError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_len < 2:
            raise HyperRouterError(f"max_len must be >= 2, got {self.max_len}")
        if self.lr <= 0:
            raise HyperRouterError(f"lr must be > 0, got {self.lr:g}")
        for name in ("clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise HyperRouterError(
                    f"{name} must be >= 0 (0 turns it off), got {getattr(self, name):g}"
                )
        if not self.test_top_ks:
            raise HyperRouterError("test_top_ks must list at least one k")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_finetune_config(
    name_or_path: str | None, overrides: list[str] | None = None
) -> FinetuneConfig:
    raw = load_raw(name_or_path or "sst2-cpu", kind="finetune")
    raw = apply_overrides(raw, overrides or [])
    return from_dict(FinetuneConfig, raw).validate()


# --------------------------------------------------------------------------- tokenization


_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_PUNCT = re.compile(r"([^\w\s'])")


def normalize_basic(text: str) -> str:
    """Lowercase, HTML line breaks to spaces, punctuation split off words, single spaces:
    "Great movie!<br />10/10" -> "great movie ! 10 / 10"."""
    return " ".join(_PUNCT.sub(r" \1 ", _BREAK.sub(" ", text).lower()).split())


NORMALIZERS = {"none": None, "basic": normalize_basic}


def word_vocab(texts: list[str], min_freq: int = 1) -> Vocab:
    """Task vocabulary from the training texts (the reference's choice for word-level models);
    words seen fewer than min_freq times become <unk>."""
    return Vocab.from_words(texts, min_freq=min_freq)


def encode(text: str, vocab: Vocab, max_len: int) -> list[int]:
    """Token ids, head + tail truncated to max_len (first and last max_len / 2 tokens)."""
    ids = vocab.encode(text)
    if len(ids) > max_len:
        head = max_len // 2
        ids = ids[:head] + ids[len(ids) - (max_len - head) :]
    if ids:
        return ids
    # an empty text still needs one token: <unk>, or a space for a bpe vocabulary (no <unk>)
    return [vocab.unk_id] if vocab.unk_id is not None else vocab.encode(" ")[:1]


@dataclass
class Encoded:
    ids: list[list[int]]
    labels: list[int]


def encode_split(split: ClassificationSplit, vocab: Vocab, max_len: int) -> Encoded:
    return Encoded([encode(t, vocab, max_len) for t in split.texts], list(split.labels))


def make_batch(
    data: Encoded, index: list[int], device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """tokens [L, B] right-padded with 0, lengths [B], labels [B]."""
    seqs = [data.ids[i] for i in index]
    lengths = torch.tensor([len(s) for s in seqs])
    tokens = torch.zeros(int(lengths.max()), len(seqs), dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[: len(s), b] = torch.tensor(s)
    labels = torch.tensor([data.labels[i] for i in index])
    return tokens.to(device), lengths.to(device), labels.to(device)


def accuracy(logits: Tensor, labels: Tensor) -> tuple[int, int]:
    """(number correct, number of examples) for argmax predictions."""
    return int((logits.argmax(-1) == labels).sum()), int(labels.numel())


@torch.no_grad()
def evaluate_accuracy(
    model: Classifier, data: Encoded, batch_size: int, device: torch.device, top_k: int | None
) -> tuple[float, float]:
    """(accuracy, examples per second) in eval mode at `top_k` experts. Under torchrun every rank
    takes every W-th example and the counts are summed over the ranks."""
    was_training = model.training
    model.eval()
    if top_k is not None and model.body.moe_layers():
        model.body.set_top_k(top_k)
    order = sorted(range(len(data.ids)), key=lambda i: len(data.ids[i]))  # less padding
    ctx = distributed.current()
    order = order[ctx.rank :: ctx.world_size]
    correct = total = 0
    start = time.perf_counter()
    for i in range(0, len(order), batch_size):
        tokens, lengths, labels = make_batch(data, order[i : i + batch_size], device)
        logits, _, _ = model(tokens, lengths)
        c, n = accuracy(logits, labels)
        correct, total = correct + c, total + n
    model.train(was_training)
    seconds = time.perf_counter() - start
    if ctx.enabled:
        counts = torch.tensor([correct, total], dtype=torch.float64, device=device)
        correct, total = (int(v) for v in distributed.all_reduce_sum(counts))
    return correct / max(total, 1), total / max(seconds, 1e-9)


# --------------------------------------------------------------------------- the run


@dataclass
class Prepared:
    config: FinetuneConfig
    task: TaskData
    vocab: Vocab
    new_vocab: bool
    model: Classifier
    init: dict[str, Any]


def prepare(config: FinetuneConfig, init: str | None, device: torch.device) -> Prepared:
    """Load the task and build the classifier from a pretrained run (or from scratch)."""
    if config.data is None:
        raise HyperRouterError("no task data: pass --data PATH (see `hyperrouter finetune -h`)")
    task = load_task(
        config.task,
        config.data,
        valid_fraction=config.valid_fraction,
        seed=config.seed,
        max_examples=config.max_examples,
        max_test_examples=config.max_test_examples,
    )
    normalizer = NORMALIZERS[config.normalize]
    if normalizer is not None:

        def normalized(split):
            return dataclasses.replace(split, texts=[normalizer(t) for t in split.texts])

        task = dataclasses.replace(
            task,
            train=normalized(task.train),
            valid=normalized(task.valid),
            test=normalized(task.test),
        )
    torch.manual_seed(config.seed)
    if init is not None:
        run = load_trained(init, "best_all_experts", device=torch.device("cpu"))
        body, pre_vocab = run.model, run.vocab
        init_info = {"run": str(Path(init)), "checkpoint": str(run.folder), "kind": run.kind}
        pre_config = run.config
    else:
        schedule = TrainConfig(
            top_k_schedule=config.top_k_schedule,
            top_k_min=config.top_k_min,
            top_k_max=config.top_k_max,
        )
        if config.model.arch == "qwen3":
            schedule.mem_len = 0  # the decoder keeps no recurrence memory
        pre_config = RunConfig(
            model=config.model, moe=config.moe, train=schedule, eval=EvalConfig(top_ks=[1])
        ).validate()
        body, pre_vocab = None, None
        init_info = {"run": None}
    tokenizer = config.tokenizer
    if tokenizer == "auto":
        tokenizer = pre_vocab.kind if pre_vocab is not None else "char"
    if tokenizer == "bpe" and (pre_vocab is None or pre_vocab.kind != "bpe"):
        raise HyperRouterError(
            "tokenizer bpe reuses the byte-level BPE tokenizer of a run trained with data.kind "
            "bpe; pass --init with such a run, or use tokenizer char or word"
        )
    if tokenizer in ("char", "bpe") and pre_vocab is not None and pre_vocab.kind == tokenizer:
        vocab, new_vocab = pre_vocab, False
    elif tokenizer == "char":
        vocab, new_vocab = Vocab.from_bytes(t.encode("utf-8") for t in task.train.texts), True
    else:
        vocab, new_vocab = word_vocab(task.train.texts, config.min_word_freq), True
    if body is None:
        body = pre_config.build_model(len(vocab))
        new_vocab_size = None
    else:
        new_vocab_size = len(vocab) if new_vocab else None
    model = Classifier(
        body,
        task.num_classes,
        pooling=config.pooling,
        head_dropout=config.head_dropout,
        new_vocab_size=new_vocab_size,
    )
    init_info["tokenizer"] = tokenizer
    init_info["new_vocabulary"] = new_vocab or init is None
    return Prepared(config, task, vocab, new_vocab, model.to(device), init_info)


def finetune_run(
    config: FinetuneConfig,
    out_dir: str | Path,
    *,
    init: str | None = None,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Fine-tune, choose the checkpoint on valid, test at every k; returns results.json.

    Under torchrun (`hyperrouter.distributed`) every rank takes its equal share of each batch, the
    gradients are averaged over the ranks, accuracies are counted over all ranks and only
    rank 0 writes. Dropout draws per rank, so results match one process statistically, not bit
    for bit (pretraining's chunked seeds do that for `hyperrouter train`)."""
    config.validate()
    with runlock.locked(out_dir):
        return _finetune(config, Path(out_dir), init, progress, log)


def _finetune(
    config: FinetuneConfig, out: Path, init: str | None, progress: bool, log
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    ctx = distributed.current()
    main_rank = ctx.is_main
    progress = progress and main_rank

    def check_out() -> None:
        if runlock.holds_files(out):
            raise HyperRouterError(f"{out} already holds files; choose another --out")

    distributed.on_main(check_out)
    if config.batch_size % ctx.world_size:
        raise HyperRouterError(
            f"batch_size {config.batch_size} does not split over {ctx.world_size} ranks"
        )
    device = ctx.device if ctx.enabled else pick_device(config.device)
    prep = prepare(config, init, device)
    model, task = prep.model, prep.task
    experts = model.body.num_experts if model.body.moe_layers() else 1
    if model.body.moe_layers() and not 1 <= config.top_k_min <= config.top_k_max <= experts:
        raise HyperRouterError(
            f"top_k_min/top_k_max must satisfy 1 <= top_k_min <= top_k_max <= {experts} "
            f"(experts of the model), got {config.top_k_min} and {config.top_k_max}"
        )
    if model.body.moe_layers():
        check_top_ks(config.test_top_ks, experts, "test_top_ks")
    train = encode_split(task.train, prep.vocab, config.max_len)
    valid = encode_split(task.valid, prep.vocab, config.max_len)
    test = encode_split(task.test, prep.vocab, config.max_len)
    meta = {
        "task": task.task,
        "labels": task.label_names,
        "source": task.source,
        "valid_source": task.valid_source,
        "sizes": {"train": len(train.ids), "valid": len(valid.ids), "test": len(test.ids)},
        "init": prep.init,
        "parameters": parameter_summary(model).as_dict(),
    }

    def create() -> None:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_json_atomic(out / "config.json", config.to_dict())
        ckpt.write_json_atomic(out / "run.json", meta)

    distributed.on_main(create)
    metrics = (out / "metrics.jsonl").open("w") if main_rank else open(os.devnull, "w")  # noqa: SIM115
    optimizer = torch.optim.Adam(
        trainable_parameters(model), lr=config.lr, weight_decay=config.weight_decay
    )
    params = trainable_parameters(model)
    if ctx.enabled:
        distributed.broadcast_parameters(list(model.parameters()))  # replicas start equal
        torch.manual_seed(config.seed * 1_000_003 + ctx.rank)  # each rank its own dropout
    share = config.batch_size // ctx.world_size
    rng = random.Random(config.seed)
    order: list[int] = []
    best = -1.0
    best_name = None
    bar = tqdm(total=config.steps, desc=f"finetune {task.task}", disable=not progress)
    model.train()
    window: list[float] = []
    for step in range(1, config.steps + 1):
        k = None
        if model.body.moe_layers():
            k = top_k_at(
                config.top_k_schedule,
                step - 1,
                config.steps,
                config.top_k_min,
                config.top_k_max,
                seed=config.seed,
            )
            model.body.set_top_k(k)
        if len(order) < config.batch_size:
            order += rng.sample(range(len(train.ids)), len(train.ids))
        index, order = order[: config.batch_size], order[config.batch_size :]
        index = index[ctx.rank * share : (ctx.rank + 1) * share]
        tokens, lengths, labels = make_batch(train, index, device)

        def forward(tokens=tokens, lengths=lengths, labels=labels) -> ChunkResult:
            logits, aux, outs = model(tokens, lengths)
            per_example = F.cross_entropy(logits.float(), labels, reduction="none")
            # each token of an example shares the example's loss (for routers that learn from it)
            token_loss = per_example.detach().expand(tokens.shape[0], -1)
            return ChunkResult(per_example.mean(), aux, token_loss, outs)

        result = training_step(
            model,
            optimizer,
            [forward],
            step=step - 1,
            clip=config.clip,
            params=params,
            after_backward=(lambda: distributed.average_gradients(params)) if ctx.enabled else None,
        )
        if ctx.enabled:
            loss = distributed.all_reduce_sum(torch.tensor([result.loss], device=device))
            result.loss = float(loss[0]) / ctx.world_size
        window.append(result.loss)
        bar.update(1)
        if step % config.log_interval == 0:
            mean = sum(window) / len(window)
            metrics.write(
                json.dumps({"step": step, "split": "train", "loss": mean, "top_k": k}) + "\n"
            )
            bar.set_postfix(loss=f"{mean:.3f}", k=k if k is not None else "-")
            window = []
        if step % config.eval_interval == 0 or step == config.steps:
            acc, _ = evaluate_accuracy(model, valid, config.eval_batch_size, device, k)
            metrics.write(
                json.dumps({"step": step, "split": "valid", "accuracy": acc, "top_k": k}) + "\n"
            )
            metrics.flush()
            if main_rank:
                bar.write(f"step {step}: valid accuracy {acc:.4f} at k={k if k else '-'}")
            if acc > best:
                best = acc
                best_name = f"step-{step:07d}"
                if main_rank:
                    ckpt.save_checkpoint(
                        out,
                        step,
                        model,
                        {"finetune": config.to_dict(), "meta": meta},
                        prep.vocab.to_dict(),
                    )
                    ckpt.update_index(out, best_valid=best_name, latest=best_name)
    bar.close()
    # test with the checkpoint that was best on validation (every rank reads rank 0's file)
    distributed.on_main(lambda: None)  # rank 0 has written it
    ckpt.load_weights(model, out / "checkpoints" / best_name)
    ks = [1]
    if model.body.moe_layers():
        ks = sorted({k for k in config.test_top_ks if 1 <= k <= experts})
    by_k, speed = {}, {}
    test_bar = tqdm(total=len(ks), desc="test", unit="k", disable=not progress)
    for k in ks:
        acc, rate = evaluate_accuracy(
            model, test, config.eval_batch_size, device, k if model.body.moe_layers() else None
        )
        by_k[str(k)] = acc
        speed[str(k)] = rate
        metrics.write(
            json.dumps({"step": config.steps, "split": "test", "accuracy": acc, "top_k": k}) + "\n"
        )
        test_bar.update(1)
        test_bar.set_postfix(k=k, accuracy=f"{acc:.4f}")
    test_bar.close()
    metrics.close()
    results = {
        "metric": "accuracy",
        "split": "test",
        "by_top_k": by_k,
        "examples_per_second": speed,
        "valid_accuracy": best,
        "checkpoint": best_name,
        "task": task.task,
        "init": prep.init,
        "parameters": meta["parameters"],
    }
    if main_rank:
        ckpt.write_json_atomic(out / "results.json", results)
    return results
