"""The Qwen3-style MoE decoder (`model.arch: qwen3`) and sub-word corpora (`data.kind: bpe`): our
MoE layers inside transformers' blocks, every router through them, k, the offline and cached BPE
tokenizer, bits per byte, a preset end to end through the CLI, kill-and-resume, config errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hyperrouter import MoE  # noqa: E402
from hyperrouter.cli import main  # noqa: E402
from hyperrouter.data import bpe  # noqa: E402
from hyperrouter.data.corpus import load_corpus  # noqa: E402
from hyperrouter.data.iterators import LMOrderedIterator  # noqa: E402
from hyperrouter.models.decoder import MoEMLP, Qwen3Decoder  # noqa: E402
from hyperrouter.models.transformer_xl import LMOutput  # noqa: E402
from hyperrouter.routers import ROUTERS  # noqa: E402
from hyperrouter.train.config import config_from_dict, load_config  # noqa: E402
from hyperrouter.train.evaluate import evaluate, metric_value, token_byte_lengths  # noqa: E402
from hyperrouter.train.step import ChunkResult, training_step  # noqa: E402
from hyperrouter.train.trainer import train_run  # noqa: E402
from tests.conftest import train_killed_after_checkpoints  # noqa: E402

pytestmark = pytest.mark.usefixtures("isolated_cache")

WORDS = (
    "the quick brown fox jumps over a lazy dog while cats run far away from home and "
    "every river sings softly under bright stars near old stone bridges"
).split()


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """About 30 KB of seeded random sentences (UTF-8, one accented word)."""
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(len(WORDS), (5000,), generator=gen).tolist()
    words = [WORDS[i] for i in picks]
    words[100] = "café"
    lines = [" ".join(words[i : i + 12]) + "\n" for i in range(0, len(words), 12)]
    path = tmp_path / "text.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def tiny(path: Path | None = None, **sections) -> dict:
    """A 2-layer d16 decoder with 4 experts in both layers, on a bpe corpus of 300 symbols."""
    cfg = {
        "data": {"path": None if path is None else str(path), "kind": "bpe", "vocab_size": 300},
        "model": {
            "arch": "qwen3",
            "n_layer": 2,
            "n_head": 2,
            "n_kv_head": 1,
            "d_head": 8,
            "d_model": 16,
            "d_inner": 32,
            "dropout": 0.1,
        },
        "moe": {
            "layers": [0, 1],
            "num_experts": 4,
            "d_expert": 16,
            "activation": "swiglu",
            "router": "hyperrouter",
            "router_options": {"hyper_hidden": 16},
        },
        "train": {
            "steps": 8,
            "batch_size": 4,
            "tgt_len": 16,
            "mem_len": 0,
            "lr": 0.003,
            "top_k_min": 1,
            "top_k_max": 4,
            "log_interval": 2,
            "eval_interval": 4,
            "device": "cpu",
        },
        "eval": {"tgt_len": 16, "batch_size": 2, "top_ks": [1, 2, 4], "max_valid_batches": 4},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- the model


def test_moe_layers_are_ours_inside_transformers_blocks_and_k_changes_the_experts() -> None:
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3MLP

    cfg = config_from_dict(tiny(moe={"layers": [1]}))
    torch.manual_seed(0)
    model = cfg.build_model(300)
    assert isinstance(model, Qwen3Decoder)
    blocks = model.decoder.layers
    assert all(isinstance(b, Qwen3DecoderLayer) for b in blocks)
    assert isinstance(blocks[0].mlp, Qwen3MLP) and isinstance(blocks[1].mlp, MoEMLP)
    (layer,) = model.moe_layers()
    assert isinstance(layer, MoE) and layer is blocks[1].mlp.moe
    assert layer.experts.activation == "swiglu" and layer.experts.b_in is None
    assert model.num_experts == 4 and model.top_k == cfg.train_top_k(0) and model.mem_len == 0

    model.eval()
    data, target = torch.randint(300, (16, 3)), torch.randint(300, (16, 3))
    outputs = {}
    for k in (1, 4):
        model.set_top_k(k)
        out = model(data, target, [])
        assert isinstance(out, LMOutput) and out.nll.shape == (16, 3) and out.mems == []
        (moe_out,) = out.moe_outputs
        assert int(moe_out.computed_pairs) == 48 * k  # every token computed k experts
        assert moe_out.routing.expert_ids.shape == (48, k)
        outputs[k] = out.nll
    assert not torch.equal(outputs[1], outputs[4])
    with pytest.raises(ValueError, match="keeps no recurrence memory"):
        model.mem_len = 16


def test_the_decoder_routes_token_ids_and_orders_tokens_like_the_targets() -> None:
    """Hash routing by token id: equal ids get equal experts wherever they are; the MoE layer sees
    [time, batch] order (the order of the per-token loss RL-R reads)."""
    cfg = config_from_dict(tiny(moe={"router": "hash", "router_options": {}}))
    torch.manual_seed(0)
    model = cfg.build_model(300).eval()
    model.set_top_k(1)
    data = torch.randint(20, (12, 3))
    out = model(data, torch.randint(300, (12, 3)), [])
    for moe_out in out.moe_outputs:
        ids = moe_out.routing.expert_ids[:, 0]
        flat = data.reshape(-1)  # [time, batch] order
        for token in flat.unique():
            assert ids[flat == token].unique().numel() == 1


def _chunk(model, data, target):
    def run() -> ChunkResult:
        out = model(data, target, [])
        return ChunkResult(out.loss, out.aux_loss, out.nll, out.moe_outputs)

    return run


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_trains_a_step_through_the_decoder(name: str) -> None:
    """Two optimizer steps (with the routers' hooks: per-step state, token-loss terms) and an
    evaluation forward at k = 1 and k = E, for every registered router."""
    cfg = config_from_dict(tiny(moe={"router": name, "router_options": {}}))
    torch.manual_seed(0)
    model = cfg.build_model(300)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data, target = torch.randint(300, (16, 4)), torch.randint(300, (16, 4))
    model.train()
    for step in range(2):
        model.set_top_k(cfg.train_top_k(step))
        result = training_step(
            model,
            optimizer,
            [_chunk(model, data, target)],
            step=step,
            clip=0.25,
            params=[p for p in model.parameters() if p.requires_grad],
        )
        assert math.isfinite(result.loss)
        assert len(result.layer_load) == 2
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(".mlp.moe.experts." in n for n in moved) and any("self_attn" in n for n in moved)
    model.eval()
    for k in (1, 4):
        model.set_top_k(k)
        with torch.no_grad():
            assert torch.isfinite(model(data, target, []).nll).all()


# --------------------------------------------------------------------------- the tokenizer


def test_bpe_tokenizer_is_trained_offline_cached_and_decodes(text_file, monkeypatch) -> None:
    calls = []
    real = bpe.train_tokenizer
    monkeypatch.setattr(bpe, "train_tokenizer", lambda *a: calls.append(a) or real(*a))
    corpus = load_corpus(text_file, kind="bpe", vocab_size=300)
    assert corpus.kind == "bpe" and len(calls) == 1
    assert 256 < len(corpus.vocab) <= 300
    raw = text_file.read_bytes()
    train_bytes = raw[: len(raw) - 2 * (len(raw) * 5 // 100)]
    assert corpus.vocab.decode_bytes(corpus.train.tolist()) == train_bytes
    text = "the lazy café sings\nunder stars\n"
    assert corpus.vocab.decode(corpus.vocab.encode(text)) == text
    lengths = corpus.vocab.token_bytes
    assert int(lengths[corpus.train].sum()) == len(train_bytes)  # bytes per token are exact

    again = load_corpus(text_file, kind="bpe", vocab_size=300)  # the corpus cache
    assert len(calls) == 1 and again.content_hash == corpus.content_hash
    for entry in (Path(os.environ["HYPERROUTER_CACHE"]) / "corpora").iterdir():
        if entry.name != "tokenizers":  # drop the token arrays: the tokenizer cache remains
            shutil.rmtree(entry)
    third = load_corpus(text_file, kind="bpe", vocab_size=300)
    assert len(calls) == 1 and torch.equal(third.train, corpus.train)
    other = load_corpus(text_file, kind="bpe", vocab_size=280)  # other options: trained anew
    assert len(calls) == 2 and other.content_hash != corpus.content_hash


def test_bpe_training_is_deterministic_across_processes(text_file) -> None:
    here = bpe.fingerprint(bpe.train_tokenizer(text_file.read_text(), 300))
    code = (
        "import sys; from hyperrouter.data import bpe; "
        "print(bpe.fingerprint(bpe.train_tokenizer(open(sys.argv[1]).read(), 300)))"
    )
    there = subprocess.run(
        [sys.executable, "-c", code, str(text_file)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert there == here


def test_byte_level_alphabet_matches_the_tokenizers_one() -> None:
    from tokenizers.pre_tokenizers import ByteLevel

    assert set(bpe._BYTE_OF) == set(ByteLevel.alphabet())
    assert sorted(bpe._BYTE_OF.values()) == list(range(256))
    assert bpe.symbol_bytes("Ġthe") == b" the"


def test_bits_per_byte_equals_a_hand_computation(text_file) -> None:
    """A stand-in model whose NLL of target t is 0.01 * (t + 1) nats: bpb is the summed NLL in
    bits over the UTF-8 bytes of exactly the targets the iterator evaluates."""
    corpus = load_corpus(text_file, kind="bpe", vocab_size=300)

    class Fixed(torch.nn.Module):
        top_k, mem_len = None, 0

        def moe_layers(self):
            return []

        def forward(self, data, target, mems):
            nll = 0.01 * (target.double() + 1)
            return LMOutput(nll.mean(), nll, [], torch.zeros(()))

    data = corpus.valid
    result = evaluate(
        Fixed(),
        data,
        batch_size=3,
        tgt_len=7,
        mem_len=0,
        top_k=None,
        device=torch.device("cpu"),
        token_bytes=token_byte_lengths(corpus.vocab),
    )
    it = LMOrderedIterator(data, 3, 7)
    targets = it.data[1:].reshape(-1).tolist()  # every column from its second token on
    bits = sum(0.01 * (t + 1) for t in targets) / math.log(2)
    nbytes = sum(len(corpus.vocab.decode_bytes([t])) for t in targets)
    assert result.tokens == len(targets) and result.bytes == nbytes
    bpb = metric_value(result.loss, "bpe", result.bytes_per_token)
    assert bpb == pytest.approx(bits / nbytes, rel=1e-12)  # float64 sums in another order


# --------------------------------------------------------------------------- end to end


PRESET_TINY = [
    "data.vocab_size=300",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_kv_head=1",
    "model.d_head=8",
    "model.d_model=16",
    "model.d_inner=32",
    "moe.layers=[0,1]",
    "moe.num_experts=4",
    "moe.d_expert=16",
    "moe.router_options={hyper_hidden: 16}",
    "train.top_k_min=1",
    "train.top_k_max=4",
    "train.steps=4",
    "train.eval_interval=4",
    "train.log_interval=2",
    "train.batch_size=4",
    "train.tgt_len=16",
    "train.warmup_steps=2",
    "eval.tgt_len=16",
    "eval.batch_size=2",
    "eval.max_valid_batches=2",
    "eval.top_ks=[1,2,4]",
]


def test_the_cpu_preset_trains_evaluates_compares_and_analyzes_through_the_cli(
    text_file, tmp_path, capsys
) -> None:
    base = ["--config", "enwik8-qwen3moe-cpu", "--data", str(text_file)]
    sets = [arg for s in PRESET_TINY for arg in ("--set", s)]
    out = tmp_path / "run"
    code, stdout, err = run_cli(["train", *base, *sets, "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert "bpb" in stdout and (out / "tokenizer.json").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "bpb" and set(results["by_top_k"]) == {"1", "2", "4"}
    assert set(results["ppl_by_top_k"]) == {"1", "2", "4"}
    assert all(0 < v < 20 for v in results["by_top_k"].values())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"bpb", "ppl"} <= set(r) for r in records)
    assert {r["split"] for r in records} == {"train", "valid", "test"}

    code, _, err = run_cli(["eval", str(out), "--json", str(tmp_path / "e.json")], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["by_top_k"] == results["by_top_k"]  # the same test pass, by the eval command
    assert again["ppl_by_top_k"] == results["ppl_by_top_k"]

    code, stdout, err = run_cli(["analyze", str(out), "--tokens", "256"], capsys)
    assert code == 0, err
    analysis = json.loads((out / "analysis" / "analysis.json").read_text())
    assert len(analysis["layers"]) == 2 and analysis["router"] == "hyperrouter"
    assert analysis["layers"][0]["tokens"] == 256

    sweep = tmp_path / "sweep"
    code, stdout, err = run_cli(
        ["compare", *base, *sets, "--methods", "hyperrouter,smoe_dropout,smoe,aux_free"]
        + ["--seeds", "1", "--out", str(sweep), "--no-progress"],
        capsys,
    )
    assert code == 0, err
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["metric"] == "bpb"
    assert set(summary["methods"]) == {"hyperrouter", "smoe_dropout", "smoe", "aux_free"}
    assert "BPB k=1" in (sweep / "table.md").read_text()


def test_a_killed_run_resumes_bit_identically_with_its_own_tokenizer(
    text_file, tmp_path, monkeypatch
) -> None:
    """Killed after the step-8 checkpoint and resumed with the corpus cache gone and tokenizer
    training refused: the run reads RUN/tokenizer.json back, and its metrics, results and final
    weights equal those of the run that was never stopped (dropout on: per-chunk seeds)."""
    from safetensors.torch import load_file

    cfg = config_from_dict(tiny(text_file, train={"steps": 12, "batch_chunk": 2}))
    straight = train_run(cfg, tmp_path / "a", progress=False, log=lambda _: None)
    cache = os.environ["HYPERROUTER_CACHE"]
    train_killed_after_checkpoints(cfg, tmp_path / "b", monkeypatch)  # (undoes monkeypatch)
    shutil.rmtree(cache)
    monkeypatch.setenv("HYPERROUTER_CACHE", cache)

    def refuse(*_):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(bpe, "train_tokenizer", refuse)
    resumed = train_run(None, tmp_path / "b", resume=True, progress=False, log=lambda _: None)
    assert resumed["by_top_k"] == straight["by_top_k"]
    assert resumed["ppl_by_top_k"] == straight["ppl_by_top_k"]

    def lines(run: Path) -> list[dict]:
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]

    assert lines(tmp_path / "a") == lines(tmp_path / "b")

    def final(run: Path) -> dict[str, torch.Tensor]:
        index = json.loads((run / "checkpoints" / "index.json").read_text())
        return load_file(str(run / "checkpoints" / index["latest"] / "model.safetensors"))

    a, b = final(tmp_path / "a"), final(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# --------------------------------------------------------------------------- configs


def test_the_gpu_preset_validates_and_builds_on_cpu() -> None:
    cfg = load_config("enwik8-qwen3moe-gpu")
    assert cfg.model.arch == "qwen3" and cfg.data.kind == "bpe" and cfg.train.amp == "bf16"
    assert cfg.train.mem_len == 0 and cfg.eval.tgt_len == cfg.train.tgt_len
    with torch.device("meta"):  # the structure, without 200M parameters' worth of init
        model = cfg.build_model(cfg.data.vocab_size)
    assert len(model.moe_layers()) == 8 and model.num_experts == 16
    cpu = load_config("enwik8-qwen3moe-cpu")
    assert cpu.moe.router == "hyperrouter" and cpu.moe.activation == "swiglu"
    assert (cpu.train.steps, cpu.train.top_k_min, cpu.train.top_k_max) == (1200, 8, 16)


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        (["model.arch=llama"], "unknown model.arch 'llama'; valid: transformer_xl, qwen3"),
        (["data.vocab_size=100"], "data.vocab_size must be >= 257 for data.kind bpe"),
        (["train.mem_len=16"], "model.arch qwen3 keeps no recurrence memory: set train.mem_len=0"),
        (["model.adaptive=true"], "model.adaptive is a model.arch transformer_xl setting"),
        (["model.n_kv_head=3"], "model.n_kv_head must divide model.n_head=4"),
    ],
)
def test_bad_decoder_config_values_are_one_line_errors(
    settings, needle, text_file, tmp_path, capsys
) -> None:
    args = ["train", "--config", "enwik8-qwen3moe-cpu", "--data", str(text_file)]
    args += [arg for s in settings for arg in ("--set", s)]
    out = tmp_path / "o"
    code, _, err = run_cli([*args, "--out", str(out)], capsys)
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_bpe_without_tokenizers_is_a_one_line_error(text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` raises
    out = tmp_path / "o"
    args = ["train", "--config", "enwik8-qwen3moe-cpu", "--data", str(text_file), "--out", str(out)]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "bash scripts/setup.sh hf" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_finetune_on_a_decoder_run_reuses_its_bpe_tokenizer_and_learns(text_file, tmp_path):
    """`hyperrouter finetune --init RUN` on a qwen3 run: the run's BPE tokenizer (tokenizer auto),
    its trained weights loaded into the classifier body, a separable task learned, test at every
    k, the hypernetwork still frozen."""
    from safetensors.torch import load_file

    from hyperrouter.train.finetune import finetune_run, prepare
    from tests.test_finetune import separable_task, tiny_ft

    run = tmp_path / "run"
    train_run(config_from_dict(tiny(text_file)), run, progress=False, log=lambda _: None)
    data = separable_task(tmp_path / "task")
    config = tiny_ft(data, steps=40, eval_interval=20)
    prep = prepare(config, str(run), torch.device("cpu"))
    assert prep.vocab.kind == "bpe" and not prep.new_vocab
    assert prep.init["tokenizer"] == "bpe" and isinstance(prep.model.body, Qwen3Decoder)
    assert prep.model.body.lm_head is None
    index = json.loads((run / "checkpoints" / "index.json").read_text())
    weights = load_file(str(run / "checkpoints" / index["best_all_experts"] / "model.safetensors"))
    loaded = prep.model.body.moe_layers()[0].router.embedding
    assert torch.equal(loaded, weights["decoder.layers.0.mlp.moe.router.embedding"])

    out = tmp_path / "ft"
    results = finetune_run(config, out, init=str(run), progress=False)
    assert set(results["by_top_k"]) == {"1", "2", "4"} and results["by_top_k"]["4"] == 1.0
    tuned = load_file(str(out / "checkpoints" / results["checkpoint"] / "model.safetensors"))
    frozen = [key for key in weights if "hypernet" in key]
    assert frozen and all(torch.equal(tuned[f"body.{key}"], weights[key]) for key in frozen)


def test_decoder_classifier_ignores_right_padding() -> None:
    """An example's logits do not depend on the padding after it (causal attention, padding not
    routed), and padding adds nothing to the router's token counts."""
    from hyperrouter.models.classifier import Classifier

    torch.manual_seed(0)
    body = config_from_dict(tiny(moe={"router": "smoe", "router_options": {}})).build_model(300)
    model = Classifier(body, 3, head_dropout=0.0).eval()
    model.body.set_top_k(2)
    short = torch.randint(300, (5, 1))
    alone, _, _ = model(short, torch.tensor([5]))
    padded = torch.cat([short, torch.zeros(7, 1, dtype=torch.long)])
    other = torch.randint(300, (12, 1))
    both, _, outs = model(torch.cat([padded, other], 1), torch.tensor([5, 12]))
    torch.testing.assert_close(both[0], alone[0], rtol=1e-5, atol=1e-6)  # fp32 summation order
    assert all(int(out.computed_pairs) == (5 + 12) * 2 for out in outs)


def test_finetune_a_decoder_from_scratch_and_bpe_needs_a_bpe_run(tmp_path, capsys) -> None:
    from hyperrouter.train.finetune import finetune_run
    from tests.test_finetune import separable_task, tiny_ft

    data = separable_task(tmp_path / "task")
    cfg = config_from_dict(tiny())
    scratch = tiny_ft(data, steps=6, eval_interval=6, model=cfg.model, moe=cfg.moe)
    results = finetune_run(scratch, tmp_path / "scratch", init=None, progress=False)
    assert results["init"]["tokenizer"] == "char" and 0 <= results["by_top_k"]["4"] <= 1
    args = ["finetune", "--task", "sst2", "--data", str(data), "--set", "tokenizer=bpe"]
    code, _, err = run_cli([*args, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "tokenizer bpe reuses" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_data_parallel_training_under_torchrun_equals_one_process(text_file, tmp_path) -> None:
    """2 ranks (gloo, one thread each) x 1 chunk == 1 process x 2 chunks, bit for bit (dropout
    on: per-chunk seeds); nothing in the trainer's distributed path is model-specific."""
    from safetensors.torch import load_file

    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(tiny(text_file, train={"steps": 4, "batch_chunk": 2})))
    args = ["train", "--config", str(config), "--no-progress"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: CPU matmuls split their sums by thread count
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "hyperrouter", *args, "--out", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr + done.stdout

    def weights(run: Path) -> dict[str, torch.Tensor]:
        index = json.loads((run / "checkpoints" / "index.json").read_text())
        return load_file(str(run / "checkpoints" / index["latest"] / "model.safetensors"))

    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys() and all(torch.equal(one[n], two[n]) for n in one)


def test_transformer_xl_tools_refuse_the_decoder_in_one_line(capsys) -> None:
    """bench model, adaptive and serve use Transformer-XL's internals: one line each (the same
    check; bench model takes a preset, the others a run)."""
    code, _, err = run_cli(["bench", "model", "--config", "enwik8-qwen3moe-cpu"], capsys)
    assert code == 2 and "supports model.arch transformer_xl only, not qwen3" in err
    assert len(err.strip().splitlines()) == 1
