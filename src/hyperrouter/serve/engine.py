"""The model behind `hyperrouter serve`: scoring and sampling at any k, one request or a batch.

A request's text is encoded with the run's vocabulary; the prompt runs through the model in
segments of at most the training length with recurrence memory, then every new token is one step
of the model on that memory. The memory is kept as each layer's projected keys and values
(`TransformerXL.body`'s kv_memory), so a step projects only its new token, not the whole memory
again. A step runs every sequence given to it as one
forward: the sequences are stacked as columns, their memories left-padded to the longest and the
padding masked, so requests at different points of their generation share a step (the server's
continuous batching). Sampling draws from each request's own generator, seeded by the request, so a
request gets the same text alone or in a batch, at the same k (up to float rounding of batched
matrix products, which moves a draw only when it falls within ~1e-7 of a boundary).

`generate` and `score` are the library's own sampling and scoring, with the same code path as
the server (`Engine`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hyperrouter.data.vocab import UNK
from hyperrouter.errors import HyperRouterError
from hyperrouter.models.transformer_xl import TransformerXL
from hyperrouter.train.evaluate import LoadedRun


class BadRequest(HyperRouterError):
    """Bad input of one request: the message and the field it is about (an HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Sampling:
    """How one request samples: temperature 0 is greedy; top_p the nucleus; stop strings end it."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Sequence:
    """One request being generated: its ids so far, memory, next-token logits and generator."""

    prompt_ids: list[int]
    sampling: Sampling
    generator: torch.Generator
    mems: list[Tensor] = field(default_factory=list)
    logits: Tensor | None = None
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    on_token: Callable[[str], None] | None = None
    emitted: int = 0  # characters already given to on_token

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def mem_rows(self) -> int:
        return self.mems[0].shape[0] if self.mems else 0


def _complete_utf8(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 character."""
    end = len(data)
    for pos in range(end - 1, max(end - 4, -1), -1):
        byte = data[pos]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back for the lead
            continue
        need = (
            2
            if byte >> 5 == 0b110
            else 3
            if byte >> 4 == 0b1110
            else 4
            if byte >> 3 == 0b11110
            else 1
        )
        return pos if end - pos < need else end
    return end


def sample_next(logits: Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token id from next-token logits [V] (fp32): greedy at temperature 0, else softmax at
    the temperature, restricted to the smallest set of tokens whose probability reaches top_p."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True, stable=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < sampling.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class Engine:
    """A trained language model ready to serve: encode, score and generate at any k."""

    def __init__(
        self,
        run: LoadedRun,
        *,
        max_prompt: int = 4096,
        max_tokens_limit: int = 512,
    ) -> None:
        self.run = run
        self.model: TransformerXL = run.model.eval()
        self.vocab = run.vocab
        self.kind = run.kind
        self.device = next(self.model.parameters()).device
        self.num_experts = self.model.num_experts if self.model.moe_layers() else 1
        self.segment = run.config.train.tgt_len
        # every token sees what the last one of a training segment saw: mem_len + tgt_len - 1
        # earlier positions (also with mem_len = 0, where a one-token step would see nothing)
        self.mem_len = run.config.train.mem_len + run.config.train.tgt_len - 1
        self.max_prompt = max_prompt
        self.max_tokens_limit = max_tokens_limit
        self.model.mem_len = self.mem_len
        # the batched memory of the last steps, by their requests (ids), with each request's
        # memory view: a step of the same requests reuses it instead of stacking them again
        self._batches: dict[tuple[int, ...], tuple[list[Tensor], list[Tensor]]] = {}

    # ------------------------------------------------------------------ input
    def check_k(self, k: object, param: str = "k") -> int:
        if isinstance(k, bool) or not isinstance(k, int):
            raise BadRequest(f"{param} must be an integer in [1, {self.num_experts}]", param)
        if not 1 <= k <= self.num_experts:
            raise BadRequest(f"{param} must be in [1, {self.num_experts}], got {k}", param)
        return k

    def encode(self, text: object, param: str = "prompt") -> list[int]:
        """Ids of a prompt; text the model's vocabulary cannot hold is refused, not replaced."""
        if not isinstance(text, str):
            raise BadRequest(f"{param} must be a string", param)
        if not text:
            raise BadRequest(f"{param} is empty", param)
        size = len(text.encode("utf-8")) if self.kind == "char" else len(text.split())
        if size > self.max_prompt:
            unit = "bytes" if self.kind == "char" else "words"
            raise BadRequest(
                f"{param} is {size} {unit}, more than the limit of {self.max_prompt}", param
            )
        ids = self.vocab.encode(text)
        if not ids:
            raise BadRequest(f"{param} has no tokens", param)
        unk = self.vocab.unk_id
        if unk in ids and (self.kind == "char" or UNK not in text.split()):
            where = ids.index(unk)
            raise BadRequest(
                f"{param} holds a symbol outside the model's vocabulary (token {where})", param
            )
        return ids

    def check_sampling(self, sampling: Sampling) -> Sampling:
        m = sampling.max_tokens
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= self.max_tokens_limit:
            raise BadRequest(
                f"max_tokens must be an integer in [1, {self.max_tokens_limit}], got {m!r}",
                "max_tokens",
            )
        t = sampling.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 10:
            raise BadRequest(f"temperature must be a number in [0, 10], got {t!r}", "temperature")
        p = sampling.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise BadRequest(f"top_p must be a number in (0, 1], got {p!r}", "top_p")
        if not all(isinstance(s, str) and s for s in sampling.stop) or len(sampling.stop) > 4:
            raise BadRequest("stop must be a string or a list of up to 4 non-empty strings", "stop")
        return sampling

    # ------------------------------------------------------------------ model calls
    def _set_k(self, k: int) -> None:
        if self.model.moe_layers():
            self.model.set_top_k(k)

    @torch.no_grad()
    def prefill(self, seq: Sequence, k: int) -> None:
        """Run the prompt (in segments, with memory): the memory and next-token logits."""
        self._set_k(k)
        ids = torch.tensor(seq.prompt_ids, dtype=torch.long, device=self.device)
        mems: list[Tensor] = []
        hidden = None
        for start in range(0, len(ids), self.segment):
            chunk = ids[start : start + self.segment, None]
            hidden, mems, _, _ = self.model.body(chunk, mems, kv_memory=True)
        seq.mems = mems
        seq.logits = self.model.crit.log_prob(hidden[-1]).float()[0]

    @torch.no_grad()
    def step(self, seqs: list[Sequence], k: int) -> None:
        """One generation step of every sequence as one forward at k (their last sampled token
        in, new logits out). Memories of different lengths are left-padded to the longest and
        the padding masked (`TransformerXL.body`'s mem_padding), so requests that started at
        different times share the step."""
        if not seqs:
            return
        self._set_k(k)
        last = torch.tensor([[s.out_ids[-1] for s in seqs]], device=self.device)
        rows = [s.mem_rows for s in seqs]
        top = max(rows)
        key = tuple(id(s) for s in seqs)
        reuse = self._batches.pop(key, None)
        if reuse is not None and all(s.mems and s.mems[0] is v for s, v in zip(seqs, reuse[1])):
            mems = reuse[0]  # the same requests as their last step: its batched memory as it is
        else:
            mems = self._stack_memory(seqs, rows, top)
        padding = None
        if min(rows) < top:
            padding = torch.tensor([top - n for n in rows], device=self.device)
        hidden, new_mems, _, _ = self.model.body(last, mems, mem_padding=padding, kv_memory=True)
        log_probs = self.model.crit.log_prob(hidden[-1]).float()
        for j, (seq, n) in enumerate(zip(seqs, rows)):
            keep = min(n + 1, self.mem_len)
            seq.mems = [m[-keep:, j : j + 1] for m in new_mems]
            seq.logits = log_probs[j]
        self._batches[key] = (new_mems, [s.mems[0] for s in seqs])
        while len(self._batches) > 8:  # one per k served together is enough
            self._batches.pop(next(iter(self._batches)))

    def _stack_memory(self, seqs: list[Sequence], rows: list[int], top: int) -> list[Tensor]:
        """The sequences' memories as one batch, each left-padded with zeros to `top` rows."""
        if not top:
            return []
        template = next(s.mems for s in seqs if s.mems)
        mems = []
        for i, like in enumerate(template):
            columns = []
            for seq, n in zip(seqs, rows):
                if n == top:
                    columns.append(seq.mems[i])
                    continue
                pad = like.new_zeros(top - n, 1, like.shape[-1])
                columns.append(torch.cat([pad, seq.mems[i]]) if n else pad)
            mems.append(torch.cat(columns, 1))
        return mems

    def sample(self, seq: Sequence) -> None:
        """Draw the next token of `seq` and end it at max_tokens or a stop string."""
        # drawn on the CPU from the request's own CPU generator: the same draws on any device
        token = sample_next(seq.logits.float().cpu(), seq.sampling, seq.generator)
        seq.out_ids.append(token)
        seq.text = self.vocab.decode(seq.out_ids)
        for stop in seq.sampling.stop:
            at = seq.text.find(stop)
            if at >= 0:
                seq.text = seq.text[:at]
                seq.finish_reason = "stop"
                break
        if seq.finish_reason is None and len(seq.out_ids) >= seq.sampling.max_tokens:
            seq.finish_reason = "length"
        if seq.on_token is not None:
            visible = seq.text if seq.done else self._settled(seq)
            if len(visible) > seq.emitted:
                seq.on_token(visible[seq.emitted :])
                seq.emitted = len(visible)

    def _settled(self, seq: Sequence) -> str:
        """The text a stream may send now: complete UTF-8 characters only (a character's first
        bytes decode to U+FFFD until its last byte arrives), less any ending that may still
        become a stop string."""
        text = seq.text
        if self.kind == "char":
            data = self.vocab.decode_bytes(seq.out_ids)
            text = data[: _complete_utf8(data)].decode("utf-8", errors="replace")
        hold = 0
        for stop in seq.sampling.stop:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        return text[: len(text) - hold]

    def new_sequence(self, prompt: str, sampling: Sampling) -> Sequence:
        ids = self.encode(prompt)
        sampling = self.check_sampling(sampling)
        gen = torch.Generator()
        if sampling.seed is not None:
            gen.manual_seed(sampling.seed)
        else:
            gen.seed()  # this request's own non-deterministic seed (the global RNG untouched)
        return Sequence(ids, sampling, gen)

    def generate_batch(self, seqs: list[Sequence], k: int) -> None:
        """Generate every sequence to its end at k, the steps of all of them batched together."""
        for seq in seqs:
            if seq.done:  # cancelled while it waited (its client went away)
                continue
            self.prefill(seq, k)
            self.sample(seq)
        active = [s for s in seqs if not s.done]
        while active:
            self.step(active, k)
            for seq in active:
                self.sample(seq)
            active = [s for s in active if not s.done]

    @torch.no_grad()
    def score(self, text: str, k: int) -> dict[str, float | int | list[float]]:
        """Per-token loss (nats) of `text` after its first token at k, read exactly as
        `hyperrouter eval` reads a corpus (segments of eval.tgt_len with eval's memory), so the
        mean equals evaluation's loss on the same ids."""
        from hyperrouter.train.evaluate import eval_mem_len

        ids = self.encode(text, "text")
        if len(ids) < 2:
            raise BadRequest("text needs at least two tokens to score", "text")
        self._set_k(k)
        config = self.run.config
        segment = config.eval.tgt_len
        data = torch.tensor(ids, dtype=torch.long, device=self.device)
        losses: list[Tensor] = []
        mems: list[Tensor] = []
        self.model.mem_len = eval_mem_len(config)
        try:
            for start in range(0, len(ids) - 1, segment):
                target = data[start + 1 : start + 1 + segment, None]
                inp = data[start : start + len(target), None]
                out = self.model(inp, target, mems)
                mems = out.mems
                losses.append(out.nll.float().reshape(-1))
        finally:
            self.model.mem_len = self.mem_len
        nll = torch.cat(losses)
        mean = float(nll.double().mean())
        result: dict[str, float | int | list[float]] = {
            "tokens": int(nll.numel()),
            "loss": mean,
            "token_losses": [round(float(v), 6) for v in nll],
            "k": k,
        }
        if self.kind == "char":
            result["bpc"] = mean / math.log(2)
        else:
            result["perplexity"] = math.exp(min(mean, 700.0))
        return result


def generate(
    engine: Engine,
    prompt: str,
    *,
    k: int,
    max_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: list[str] | None = None,
) -> str:
    """The model's own sampling of one prompt at k (what the server answers at a pinned k)."""
    engine.check_k(k)
    seq = engine.new_sequence(prompt, Sampling(max_tokens, temperature, top_p, stop or [], seed))
    engine.generate_batch([seq], k)
    return seq.text
