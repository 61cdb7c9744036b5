"""Language-model training: the whole loop in one place.

text -> corpus -> ordered segments -> Transformer-XL (+ MoE) -> loss (+ aux) -> Adam, cosine LR,
grad clip, progressive top-k -> periodic validation (training k and all experts) -> checkpoints
-> final test at every inference k -> results.json.

The batch's `batch_size` columns (contiguous parts of the stream) are cut into G =
`train.batch_chunk` chunks, each with its own forward, backward and memory, and chunk g gets its
own random seed (seed, step, g). Under torchrun (`hyperrouter.distributed`) the same loop runs on
every rank, rank r takes the chunks [r G / W, (r + 1) G / W) (G is raised to the next multiple of
the W ranks, with a log line, when it is not one), and after the step's backwards the gradients
are averaged over the ranks (`distributed.average_gradients`). A run therefore computes the same
thing on any number of ranks that divides G, up to the order of the floating-point sums (bit for
bit on 2 ranks at equal thread counts). Memories, metrics, validation and the
final test are reduced over the ranks; only rank 0 writes into the run folder, which every rank
must see (one machine or a shared file system).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hyperrouter import distributed
from hyperrouter.data.corpus import Corpus, load_corpus
from hyperrouter.data.iterators import LMOrderedIterator
from hyperrouter.errors import HyperRouterError
from hyperrouter.moe import expert_parallel
from hyperrouter.params import parameter_summary, trainable_parameters
from hyperrouter.train import checkpoint as ckpt
from hyperrouter.train import runlock, upcycle
from hyperrouter.train.config import RunConfig, config_diff, config_from_dict
from hyperrouter.train.evaluate import (
    autocast,
    bytes_per_token,
    cost_and_aiq,
    eval_mem_len,
    evaluate,
    evaluate_at_ks,
    inference_ks,
    lr_at,
    metric_name,
    metric_value,
    pick_device,
    record_metrics,
    secondary_metrics,
    token_byte_lengths,
)
from hyperrouter.train.step import ChunkResult, StepResult, training_step

RUN_FILE = "run.json"
TOKENIZER_FILE = "tokenizer.json"  # a bpe corpus's tokenizer, beside the checkpoints


# --------------------------------------------------------------------------- the run


class Run:
    """A training run in RUN_DIR: created fresh, or resumed from its latest checkpoint."""

    def __init__(
        self,
        config: RunConfig,
        out_dir: Path,
        *,
        resume: bool = False,
        progress: bool = True,
        log=print,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.dist = distributed.current()
        self.main = self.dist.is_main
        self.progress = progress and self.main
        self.log = log if self.main else (lambda *_: None)
        if resume:
            config = distributed.on_main(lambda: self._resumed_config(config))
        else:
            distributed.on_main(self._check_fresh_out_dir)
        self.config = config.validate()
        self.device = self.dist.device if self.dist.enabled else pick_device(config.train.device)
        self._check_layout()
        # everything that can fail on bad input happens before the run directory is created
        self.corpus: Corpus = load_corpus(
            config.data.path,
            kind=config.data.kind,
            vocab_size=config.data.vocab_size,
            tokenizer=self._saved_tokenizer() if resume else None,
        )
        self.kind = self.corpus.kind
        self.token_bytes = token_byte_lengths(self.corpus.vocab)  # bpe: for bits per byte
        # bpe training lines: bits per byte at the training split's mean bytes per token
        self.train_bytes_per_token = bytes_per_token(self.corpus.vocab, self.corpus.train)
        self.train_iter = LMOrderedIterator(
            self.corpus.train, config.train.batch_size, config.train.tgt_len, device=self.device
        )
        for split in ("valid", "test"):
            LMOrderedIterator(
                getattr(self.corpus, split), config.eval.batch_size, config.eval.tgt_len
            )
        torch.manual_seed(config.train.seed)
        self.model = config.build_model(len(self.corpus.vocab)).to(self.device)
        if config.train.init_from and not resume:  # a resumed run has its own weights
            source = upcycle.load_source(
                config.train.init_from, len(self.corpus.vocab), config.model.arch
            )
            counts = upcycle.initialise_from(
                self.model, source, noise=config.train.init_noise, seed=config.train.seed
            )
            self.log(
                f"init from {config.train.init_from}: {counts['copied']} tensors copied, "
                f"{counts['upcycled_layers']} dense FFNs upcycled, "
                f"{counts['left_initialised']} left as initialised"
            )
        self.summary = parameter_summary(self.model)  # before sharding: every expert counted
        self.expert_parallel = self.dist.ep_size > 1 and bool(self.model.moe_layers())
        if self.expert_parallel:
            expert_parallel.shard_experts(self.model, self.dist.ep_group)
        self.optimizer = self._new_optimizer(self.model)
        self.step = 0
        self.mems: list[list[Tensor]] = []  # per batch chunk, per layer
        self.best: dict[str, float] = {}
        self.train_tokens = 0
        self.train_seconds = 0.0
        self.diverging_since: int | None = None  # first step of a run of losses above the guard
        if resume:
            self._restore()
        else:
            self._create()
        self.replicated = self._replicated_parameters()
        replicated = {id(p) for p in self.replicated}
        self.sharded = [p for p in self.model.parameters() if id(p) not in replicated]
        if self.dist.enabled:  # the replicas start from rank 0's values
            distributed.broadcast_parameters(self.replicated)

    def _new_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        t = self.config.train
        return torch.optim.Adam(trainable_parameters(model), lr=t.lr, weight_decay=t.weight_decay)

    def _saved_tokenizer(self) -> str | None:
        """The tokenizer a bpe run was trained with (RUN/tokenizer.json), so that a resumed run
        does not train it again; None for other kinds or when the file is missing."""
        path = self.out_dir / TOKENIZER_FILE
        if self.config.data.kind == "bpe" and path.is_file():
            return path.read_text()
        return None

    def _check_fresh_out_dir(self) -> None:
        if runlock.holds_files(self.out_dir):
            raise HyperRouterError(
                f"{self.out_dir} already holds files; use --resume to continue that run or "
                f"choose another --out"
            )

    def _check_layout(self) -> None:
        """The global chunks (train.batch_chunk, raised to a multiple of the ranks) and this
        rank's share of them; under torchrun the batch must split into equal chunks."""
        world, chunks = self.dist.world_size, self.config.train.batch_chunk
        batch = self.config.train.batch_size
        self.global_chunks = -(-chunks // world) * world
        self.local_chunks = self.global_chunks // world
        if self.global_chunks != chunks:
            self.log(
                f"train.batch_chunk {chunks} -> {self.global_chunks} chunks, "
                f"{self.local_chunks} per rank on {world} ranks (the same results as one process "
                f"with batch_chunk {self.global_chunks})"
            )
        if world > 1 and batch % self.global_chunks:
            raise HyperRouterError(
                f"train.batch_size {batch} does not split into {self.global_chunks} equal chunks "
                f"over {world} ranks (train.batch_chunk {chunks})"
            )

    def _replicated_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters every rank holds whole (all of them but the sharded experts)."""
        sharded = expert_parallel.expert_parameter_names(self.model) if self.expert_parallel else ()
        return [p for n, p in self.model.named_parameters() if n not in sharded]

    def _average_gradients(self) -> None:
        """Data parallelism: the replicated parameters' gradients averaged over all ranks, the
        sharded experts' over their expert-data-parallel group (`distributed.average_gradients`)."""
        distributed.average_gradients([p for p in self.replicated if p.requires_grad])
        if self.expert_parallel:
            expert_parallel.reduce_expert_grads(
                self.model, self.dist.expert_dp_group, self.dist.world_size
            )

    # ---------------------------------------------------------------- run directory

    def _resumed_config(self, config: RunConfig | None) -> RunConfig:
        stored = self.out_dir / "config.json"
        if not stored.is_file():
            raise HyperRouterError(
                f"--resume: {self.out_dir} holds no run to resume (no config.json)"
            )
        saved = config_from_dict(ckpt.read_json(stored))
        diff = config_diff(saved.to_dict(), config.to_dict()) if config is not None else []
        if diff:
            more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
            raise HyperRouterError(
                f"--resume: {self.out_dir} was started with another config: "
                f"{'; '.join(diff[:3])}{more}; resume without --config/--set/--data to continue "
                f"it as it is, or choose another --out"
            )
        return saved

    def _create(self) -> None:
        routers = [r for m in self.model.moe_layers() for r in m.routers if r.wants_token_counts]
        if routers:  # routers built from corpus statistics see the training split's counts
            counts = torch.bincount(self.corpus.train.reshape(-1), minlength=len(self.corpus.vocab))
            for router in routers:
                router.fit_token_counts(counts)
        distributed.on_main(self._write_new_run)
        self._check_visible()

    def _check_visible(self) -> None:
        if not (self.out_dir / "config.json").is_file():
            raise HyperRouterError(
                f"rank {self.dist.rank}: {self.out_dir} (written by rank 0) is not visible here: "
                f"put --out on a file system every rank sees"
            )

    def _write_new_run(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_json_atomic(self.out_dir / "config.json", self.config.to_dict())
        summary = self.summary
        ckpt.write_json_atomic(
            self.out_dir / RUN_FILE,
            {
                "corpus": self.corpus_info(),
                "parameters": summary.as_dict(),
                "metric": metric_name(self.kind),
                "device": str(self.device),
                "torch": torch.__version__,
            },
        )
        (self.out_dir / "metrics.jsonl").write_text("")
        if self.corpus.vocab.tokenizer is not None:  # atomically: a resume reads it back
            tmp = self.out_dir / f".{TOKENIZER_FILE}.tmp"
            tmp.write_text(self.corpus.vocab.tokenizer)
            os.replace(tmp, self.out_dir / TOKENIZER_FILE)

    def corpus_info(self) -> dict[str, Any]:
        c = self.corpus
        return {
            "name": c.name,
            "kind": c.kind,
            "source": c.source,
            "content_hash": c.content_hash,
            "vocab_size": len(c.vocab),
            "tokens": {s: int(getattr(c, s).numel()) for s in ("train", "valid", "test")},
        }

    def _latest_checkpoint(self) -> str | None:
        index = ckpt.read_index(self.out_dir)
        if "latest" not in index:
            return None
        run = ckpt.read_json(self.out_dir / RUN_FILE)
        if run["corpus"]["content_hash"] != self.corpus.content_hash:
            raise HyperRouterError(
                f"--resume: the data differs from the corpus {self.out_dir} was trained on "
                f"({run['corpus']['source']})"
            )
        return index["latest"]

    def _restore(self) -> None:
        latest = distributed.on_main(self._latest_checkpoint)
        if latest is None:
            self.log(f"no checkpoint in {self.out_dir} yet: starting from step 0")
            self._create()
            return
        self._check_visible()
        folder = self.out_dir / "checkpoints" / latest
        meta = ckpt.read_json(folder / ckpt.TRAINER_FILE)
        if self.expert_parallel:  # the files hold every expert: each rank takes its own
            full = self.config.build_model(len(self.corpus.vocab))
            ckpt.load_weights(full, folder)
            group = self.dist.ep_group
            expert_parallel.load_full_state_dict(self.model, full.state_dict(), group)
            state = ckpt.optimizer_state(folder, meta)
            expert_parallel.load_full_optimizer_state(self.model, self.optimizer, state, group)
        else:
            ckpt.load_weights(self.model, folder)
            ckpt.restore_optimizer(self.optimizer, folder, meta)
        trainer = meta["trainer"]
        # a run without memories (train.mem_len 0, the qwen3 decoder) writes no state file
        state = ckpt.load_tensors(folder / ckpt.STATE_FILE) if any(trainer["num_mems"]) else {}
        self.step = meta["step"]
        self.best = trainer["best"]
        self.train_tokens = trainer["train_tokens"]
        self.train_seconds = trainer["train_seconds"]
        self.mems = self._local_mems(state, trainer["num_mems"])
        if self.main:
            self._truncate_metrics(self.step)
        self.log(f"resuming {self.out_dir} from step {self.step}")

    def _local_mems(self, state: dict[str, Tensor], num_mems: list[int]) -> list[list[Tensor]]:
        """This rank's memories from a checkpoint written by any number of ranks and chunks:
        each layer's memory of every column is put together ([mem_len, batch_size, d]) and cut
        again into this run's chunks."""
        layers = max(num_mems, default=0)
        if layers == 0 or any(n != layers for n in num_mems):
            return []
        full = [
            torch.cat([state[f"mems.{c}.{i}"] for c in range(len(num_mems))], dim=1)
            for i in range(layers)
        ]
        parts = [m.chunk(self.global_chunks, dim=1) for m in full]
        first = self.dist.rank * self.local_chunks
        return [[p[first + c].to(self.device) for p in parts] for c in range(self.local_chunks)]

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines a killed run wrote after its last checkpoint."""
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                break  # a line cut short by the kill
        path.write_text("".join(f"{line}\n" for line in keep))

    def _metric(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _save(self, **pointers: str) -> None:
        """Checkpoint (rank 0 writes; every rank takes part in gathering the memories). The
        memories are stored per layer for all columns at once (`mems.0.i`, [mem_len, batch, d])
        so that any number of ranks and chunks can resume from them."""
        layers = {len(m) for m in self.mems}
        if len(layers) == 1 and layers != {0}:
            full = [torch.cat([m[i] for m in self.mems], dim=1) for i in range(layers.pop())]
            full = [distributed.all_gather_batch(m) for m in full]
            state = {f"mems.0.{i}": m for i, m in enumerate(full)}
            num_mems = [len(full)]
        else:
            state, num_mems = {}, [0]
        model, optimizer = self.model, self.optimizer
        if self.expert_parallel:  # every expert, gathered: the files do not depend on the ranks
            group = self.dist.ep_group
            weights = expert_parallel.full_state_dict(self.model, group)
            optim = expert_parallel.full_optimizer_state(self.model, self.optimizer, group)
            if self.main:
                model = self.config.build_model(len(self.corpus.vocab))
                model.load_state_dict(weights)
                optimizer = self._new_optimizer(model)
                optimizer.load_state_dict(optim)
        if self.main:
            self._write_checkpoint(model, optimizer, state, num_mems, pointers)

    def _write_checkpoint(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Tensor],
        num_mems: list[int],
        pointers: dict[str, str],
    ) -> None:
        name = ckpt.save_checkpoint(
            self.out_dir,
            self.step,
            model,
            self.checkpoint_config(),
            self.corpus.vocab.to_dict(),
            trainer={
                "best": self.best,
                "train_tokens": self.train_tokens,
                "train_seconds": self.train_seconds,
                "num_mems": num_mems,
                "top_k": self.model.top_k,
            },
            optimizer=optimizer,
            state_tensors=state,
        )
        ckpt.update_index(self.out_dir, latest=name, **{k: name for k in pointers})

    def checkpoint_config(self) -> dict[str, Any]:
        return {"run": self.config.to_dict(), "n_token": len(self.corpus.vocab), "kind": self.kind}

    # ---------------------------------------------------------------- training
    def train(self) -> dict[str, Any]:
        """Train to config.train.steps, then evaluate on test at every k; returns results.json."""
        cfg = self.config
        t = cfg.train
        metric = metric_name(self.kind)
        bar = _progress_bar(t.steps, self.step, self.progress)
        model, opt = self.model, self.optimizer
        model.train()
        window = _Window()
        while self.step < t.steps:
            layers = model.moe_layers()
            k = cfg.train_top_ks(self.step, len(layers)) if layers else None
            if k is not None:
                model.set_top_k(k)
            lr = lr_at(self.step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            inp, target, seq_len = self.train_iter.get_batch(self.step % len(self.train_iter))
            start = time.perf_counter()
            result = training_step(
                model,
                opt,
                self._chunks(inp, target),
                step=self.step,
                clip=t.clip,
                params=trainable_parameters(model),
                after_backward=self._average_gradients if self.dist.enabled else None,
                sharded=self.sharded,
                shard_group=self.dist.ep_group,
            )
            if self.dist.enabled:  # the same loss on every rank: all stop together on divergence
                result.loss = (
                    float(
                        distributed.all_reduce_sum(torch.tensor([result.loss], device=self.device))[
                            0
                        ]
                    )
                    / self.dist.world_size
                )
            loss_value = result.loss
            if not math.isfinite(loss_value):
                raise HyperRouterError(
                    f"training diverged at step {self.step} (loss {loss_value}); "
                    f"try a lower train.lr or train.clip{self._last_good()}"
                )
            self._guard_divergence(loss_value)
            elapsed = time.perf_counter() - start
            tokens = seq_len * t.batch_size
            self.step += 1
            self.train_tokens += tokens
            self.train_seconds += elapsed
            window.add(result, tokens, elapsed)
            bar.update(1)
            if self.step % t.log_interval == 0 or self.step == t.steps:
                mean = window.loss / window.steps
                record = {
                    "step": self.step,
                    "split": "train",
                    "loss": mean,
                    **self._train_metrics(mean),
                    "top_k": k,
                    "lr": lr,
                    "tokens_per_second": window.tokens / max(window.time, 1e-9),
                    **_merge_routing_records(
                        distributed.all_gather_objects(window.routing_record())
                    ),
                }
                self._metric(record)
                bar.set_postfix(
                    loss=f"{mean:.3f}",
                    **{metric: f"{record[metric]:.3f}"},
                    k=k if k is not None else "-",
                    tok_s=f"{record['tokens_per_second']:.0f}",
                )
                window = _Window()
            if self.step % t.eval_interval == 0 or self.step == t.steps:
                # an elastic-k schedule's draw is random: validate at the k it ends at instead
                self._validate(cfg.final_top_k() if cfg.elastic and k else k, metric, bar)
        bar.close()
        return self.final_test()

    def _chunks(self, inp: Tensor, target: Tensor) -> list[Callable[[], ChunkResult]]:
        """This rank's column chunks of the batch (each with its own memory), so that big batches
        fit in little memory and spread over ranks; each chunk's forward is run by the training
        step, with the random seed of its global chunk index."""
        chunks = self.local_chunks
        first = self.dist.rank * chunks
        if not self.mems:
            self.mems = [[] for _ in range(chunks)]
        inp_parts = inp.chunk(self.global_chunks, dim=1)[first : first + chunks]
        target_parts = target.chunk(self.global_chunks, dim=1)[first : first + chunks]

        def forward(i: int, inp_i: Tensor, target_i: Tensor) -> ChunkResult:
            torch.manual_seed(chunk_seed(self.config.train.seed, self.step, first + i))
            with autocast(self.device, self.config.train.amp):
                out = self.model(inp_i, target_i, self.mems[i])
            self.mems[i] = out.mems
            return ChunkResult(out.loss, out.aux_loss, out.nll, out.moe_outputs)

        return [
            functools.partial(forward, i, inp_i, target_i)
            for i, (inp_i, target_i) in enumerate(zip(inp_parts, target_parts))
        ]

    def _train_metrics(self, loss: float) -> dict[str, float]:
        """The metric of a training log line (bpe: bits per byte at the training split's mean
        bytes per token, and the token perplexity)."""
        if self.kind != "bpe":
            return {metric_name(self.kind): metric_value(loss, self.kind)}
        return {
            "bpb": metric_value(loss, self.kind, self.train_bytes_per_token),
            "ppl": metric_value(loss, "word"),
        }

    def _validate(self, k: int | None, metric: str, bar) -> None:
        """Validate at the training k and with all experts (once when k is all of them), keep
        the best checkpoint of each, and print one line."""
        cfg = self.config
        kinds = {"best_train_k": k}
        if self.model.moe_layers():
            kinds["best_all_experts"] = self.model.num_experts
        results = {
            top_k: evaluate(
                self.model,
                self.corpus.valid,
                batch_size=cfg.eval.batch_size,
                tgt_len=cfg.eval.tgt_len,
                mem_len=eval_mem_len(cfg),
                top_k=top_k,
                device=self.device,
                max_batches=cfg.eval.max_valid_batches,
                amp=cfg.train.amp,
                shard=self._shard,
                token_bytes=self.token_bytes,
            )
            for top_k in dict.fromkeys(kinds.values())
        }
        pointers = {}
        for name, top_k in kinds.items():
            result = results[top_k]
            self._metric(
                {
                    "step": self.step,
                    "split": "valid",
                    "checkpoint": name,
                    "top_k": top_k,
                    "loss": result.loss,
                    **record_metrics(result, self.kind),
                }
            )
            if name not in self.best or result.loss < self.best[name]:
                self.best[name] = result.loss
                pointers[name] = True
        values = {top_k: record_metrics(r, self.kind)[metric] for top_k, r in results.items()}
        if k is None:
            line = f"{values[k]:.4f}"
        else:
            experts = self.model.num_experts
            line = f"{values[experts]:.4f} at all {experts} experts"
            if k != experts:
                line = f"{values[k]:.4f} at k={k}, {line}"
        if self.main:
            bar.write(f"step {self.step}: valid {metric} {line}")
        if not self.model.moe_layers():
            pointers["best_all_experts"] = pointers.get("best_train_k", False)
        if self.diverging_since is not None:  # keep the last good checkpoint as the latest
            if self.main:
                bar.write(f"step {self.step}: no checkpoint (training loss above the guard)")
            return
        self._save(**{name: "" for name, better in pointers.items() if better})

    @property
    def divergence_limit(self) -> float:
        """The training loss the divergence guard allows (inf when it is off)."""
        factor = self.config.train.divergence_factor
        return factor * math.log(len(self.corpus.vocab)) if factor else math.inf

    def _guard_divergence(self, loss: float) -> None:
        """Stop a run whose training loss stays above `divergence_limit` for
        train.divergence_steps steps in a row (it is not learning; it would only waste time and
        write a model that predicts worse than a uniform guess)."""
        if loss <= self.divergence_limit:
            self.diverging_since = None
            return
        if self.diverging_since is None:
            self.diverging_since = self.step
        t = self.config.train
        if self.step - self.diverging_since + 1 >= t.divergence_steps:
            raise HyperRouterError(
                f"training stopped at step {self.step}: the training loss stayed above "
                f"{self.divergence_limit:.3g} (train.divergence_factor {t.divergence_factor:g} x "
                f"ln {len(self.corpus.vocab)} tokens) for {t.divergence_steps} steps (now "
                f"{loss:.4g}); try a lower train.lr (now {t.lr:g}) or train.clip"
                f"{self._last_good()}"
            )

    def _last_good(self) -> str:
        latest = ckpt.read_index(self.out_dir).get("latest") if self.main else None
        return f"; the last good checkpoint, {latest}, is kept" if latest else ""

    @property
    def _shard(self) -> tuple[int, int] | None:
        return (self.dist.rank, self.dist.world_size) if self.dist.enabled else None

    def final_test(self) -> dict[str, Any]:
        """Test at every inference k with the best all-experts checkpoint (as the reference)."""
        cfg = self.config
        folder = distributed.on_main(
            lambda: ckpt.resolve_checkpoint(self.out_dir, "best_all_experts")
        )
        model = cfg.build_model(len(self.corpus.vocab)).to(self.device)
        ckpt.load_weights(model, folder)
        if self.expert_parallel:
            expert_parallel.shard_experts(model, self.dist.ep_group)
        ks = inference_ks(model, cfg)
        metric = metric_name(self.kind)
        others: dict[str, dict[str, float]] = {}

        def log_test(k: int, result) -> None:
            values = record_metrics(result, self.kind)
            self._metric(
                {"step": self.step, "split": "test", "top_k": k, "loss": result.loss, **values}
            )
            secondary_metrics(others, k, result, self.kind)

        by_k, speed, mean_k = evaluate_at_ks(
            model,
            self.corpus.test,
            cfg,
            self.kind,
            ks,
            self.device,
            on_result=log_test,
            progress=self.progress,
            shard=self._shard,
            token_bytes=self.token_bytes,
        )
        extra = cost_and_aiq(model, cfg, metric, by_k, speed, mean_k)
        speed["train"] = self.train_tokens / max(self.train_seconds, 1e-9)
        results = {
            "metric": metric,
            "split": "test",
            "by_top_k": by_k,
            **others,
            "tokens_per_second": speed,
            **extra,
            "checkpoint": folder.name,
            "steps": self.step,
            "parameters": self.summary.as_dict(),
        }
        if self.main:
            ckpt.write_json_atomic(self.out_dir / "results.json", results)
        return results


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    """The random seed of global chunk `chunk` at training step `step` (dropout, sampling
    routers): a pure function of the three, so it does not depend on how chunks are laid out over
    ranks, nor on where a run was resumed."""
    return int(np.random.SeedSequence([seed, step, chunk]).generate_state(1, np.uint64)[0] >> 1)


def _merge_routing_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One routing record from every rank's (`_Window.routing_record`): losses, entropies,
    dropped fractions and router statistics averaged over the ranks, expert loads summed."""
    if len(records) == 1:
        return records[0]
    merged: dict[str, Any] = {}
    first = records[0]
    n = len(records)
    if "aux_loss" in first:
        merged["aux_loss"] = sum(r["aux_loss"] for r in records) / n
        names = sorted({name for r in records for name in r["aux_losses"]})
        merged["aux_losses"] = {
            name: sum(r["aux_losses"].get(name, 0.0) for r in records) / n for name in names
        }
    if "expert_load" in first:
        merged["expert_load"] = [
            [sum(values) for values in zip(*layers)]
            for layers in zip(*(r["expert_load"] for r in records))
        ]
        merged["router_entropy_by_layer"] = [
            None if any(v is None for v in values) else sum(values) / n
            for values in zip(*(r["router_entropy_by_layer"] for r in records))
        ]
        known = [e for e in merged["router_entropy_by_layer"] if e is not None]
        if known:
            merged["router_entropy"] = sum(known) / len(known)
        merged["dropped_fraction"] = sum(r["dropped_fraction"] for r in records) / n
    names = sorted({name for r in records for name in r.get("router_stats", {})})
    if names:
        merged["router_stats"] = {}
        for name in names:
            per_rank = [
                r["router_stats"][name] for r in records if name in r.get("router_stats", {})
            ]
            merged["router_stats"][name] = [
                None if any(v is None for v in values) else sum(values) / len(values)
                for values in zip(*per_rank)
            ]
    return merged


class _Window:
    """Training metrics accumulated between two log lines."""

    def __init__(self) -> None:
        self.loss, self.steps, self.tokens, self.time = 0.0, 0, 0, 0.0
        self.aux: dict[str, float] = {}
        self.load: list[list[int]] = []
        self.entropy: list[list[float]] = []
        self.dropped = 0.0
        self.extra: list[dict[str, list[float]]] = []

    def add(self, result: StepResult, tokens: int, elapsed: float) -> None:
        self.loss += result.loss
        self.steps += 1
        self.tokens += tokens
        self.time += elapsed
        for name, value in result.aux_losses.items():
            self.aux[name] = self.aux.get(name, 0.0) + value
        if not self.load:
            self.load = [[0] * len(layer) for layer in result.layer_load]
            self.entropy = [[] for _ in result.layer_load]
        for i, layer in enumerate(result.layer_load):
            self.load[i] = [a + b for a, b in zip(self.load[i], layer)]
            if result.layer_entropy[i] is not None:
                self.entropy[i].append(result.layer_entropy[i])
        self.dropped += result.dropped_fraction
        if not self.extra:
            self.extra = [{} for _ in result.layer_router_stats]
        for i, stats in enumerate(result.layer_router_stats):
            for name, value in stats.items():
                self.extra[i].setdefault(name, []).append(value)

    def routing_record(self) -> dict[str, Any]:
        """Per-name auxiliary losses (mean per step), and per MoE layer the expert load summed
        over the window and the mean router entropy; the mean dropped fraction."""
        if not self.steps:
            return {}
        record: dict[str, Any] = {
            "aux_loss": sum(self.aux.values()) / self.steps,
            "aux_losses": {name: value / self.steps for name, value in self.aux.items()},
        }
        if self.load:
            entropy = [sum(e) / len(e) if e else None for e in self.entropy]
            record["expert_load"] = self.load
            record["router_entropy_by_layer"] = entropy
            known = [e for e in entropy if e is not None]
            if known:
                record["router_entropy"] = sum(known) / len(known)
            record["dropped_fraction"] = self.dropped / self.steps
        names = sorted({n for layer in self.extra for n in layer})
        if names:  # the routers' own diagnostics (e.g. LocMoE's off-node share), per layer
            record["router_stats"] = {
                n: [sum(layer[n]) / len(layer[n]) if n in layer else None for layer in self.extra]
                for n in names
            }
        return record


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc="train", unit="step", disable=not enabled, leave=True
    )


def train_run(
    config: RunConfig | None,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Train (or resume) a run in `out_dir`; returns the results.json contents."""
    if config is None and not resume:
        raise HyperRouterError("a config is needed to start a new run")
    with runlock.locked(out_dir):
        run = Run(config, Path(out_dir), resume=resume, progress=progress, log=log)
        if run.step >= run.config.train.steps and (run.out_dir / "results.json").exists():
            return ckpt.read_json(run.out_dir / "results.json")
        return run.train()
