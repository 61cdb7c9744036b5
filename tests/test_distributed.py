"""Data-parallel training under torchrun with 2 CPU processes (gloo): the same parameters as one
process on the same global batch, checkpoints that resume on another number of ranks, a killed or
hung rank that stops the job, one-line errors for misconfiguration. Plus the pieces without
processes: memory re-splitting and the merge of per-rank metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyperrouter.cli import main

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

SETTINGS = [
    "train.eval_interval=10",
    "train.log_interval=5",
    "train.batch_size=4",
    "train.batch_chunk=2",
    "train.tgt_len=16",
    "train.mem_len=16",
    "eval.tgt_len=16",
    "eval.batch_size=4",
    "eval.max_valid_batches=2",
    "eval.top_ks=[1,2,16]",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = "the quick brown fox jumps over a lazy dog while cats run far away".split()
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(len(words), (5000,), generator=gen).tolist()
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(" ".join(words[i] for i in picks))
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs on one thread, as every torchrun rank here (OMP_NUM_THREADS=1): CPU matmuls
    split their sums by thread count, so only equal counts make one process and two ranks compute
    the same bits (then DDP's (a + b) / 2 equals one process's a / 2 + b / 2 exactly)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(corpus: Path, out: Path, steps: int, extra: list[str] = ()) -> list[str]:
    args = ["train", "--config", "quick", "--data", str(corpus), "--out", str(out)]
    for setting in [*SETTINGS, f"train.steps={steps}", *extra]:
        args += ["--set", setting]
    return [*args, "--no-progress"]


def _torchrun(args: list[str], *, wait: bool = True, nproc: int = 2):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "hyperrouter",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=240)
    return proc.returncode, err + out  # apart: stdout and stderr lines would interleave


def _weights(run: Path, which: str = "latest") -> dict[str, torch.Tensor]:
    index = json.loads((run / "checkpoints" / "index.json").read_text())
    return load_file(str(run / "checkpoints" / index[which] / "model.safetensors"))


def _results(run: Path) -> dict[str, float]:
    return json.loads((run / "results.json").read_text())["by_top_k"]


def test_two_ranks_train_the_same_parameters_as_one_process(corpus: Path, tmp_path: Path) -> None:
    """2 ranks x 1 chunk each == 1 process x 2 chunks (dropout on, per-chunk seeds)."""
    assert main(_args(corpus, tmp_path / "one", 4)) == 0
    code, log = _torchrun(_args(corpus, tmp_path / "two", 4))
    assert code == 0, log
    for noise in ("Warning", "find_unused_parameters", "broadcast_buffers"):  # clean output
        assert noise not in log, log
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(two[name], one[name]), name  # exact: see `one_thread`
    # the final test splits columns over the ranks (other matmul shapes, sums in another order):
    # equal weights give test BPC equal to ~1e-7; 1e-4 leaves room for one near-tie routing flip
    for k, value in _results(tmp_path / "one").items():
        assert _results(tmp_path / "two")[k] == pytest.approx(value, abs=1e-4)
    train_one = [
        json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().split("\n") if x
    ]
    train_two = [
        json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().split("\n") if x
    ]
    for a, b in zip(train_one, train_two):
        assert a["step"] == b["step"] and a["split"] == b["split"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        if "expert_load" in a:
            assert a["expert_load"] == b["expert_load"]  # summed over the ranks


def test_killed_rank_stops_the_job_and_resume_on_one_process_finishes_it(
    corpus: Path, tmp_path: Path
) -> None:
    steps = 80
    extra = ["train.eval_interval=5"]  # both: the final test uses the best validated checkpoint
    reference = tmp_path / "reference"
    assert main(_args(corpus, reference, steps, extra)) == 0
    run = tmp_path / "killed"
    proc = _torchrun(_args(corpus, run, steps, extra), wait=False)
    index = run / "checkpoints" / "index.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (
            index.exists()
            and json.loads(index.read_text() or "{}").get("latest", "") >= "step-0000010"
        ):
            break
        time.sleep(0.05)
    workers = subprocess.run(
        ["ps", "--ppid", str(proc.pid), "-o", "pid="], capture_output=True, text=True
    ).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGKILL)  # rank 1 dies mid-training
    start = time.monotonic()
    out, err = proc.communicate(timeout=120)
    out = err + out
    assert proc.returncode != 0
    assert time.monotonic() - start < 60
    assert "rank      : 1" in out and "SIGKILL" in out, out  # torchrun names the dead rank
    assert not (run / "results.json").exists()
    # resume on ONE process: the memories of both ranks are re-split into its two chunks
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    # exact by construction (one thread everywhere, see `one_thread`): 2 ranks train the bits of
    # one process, the resume is bit-exact, and both final evaluations run in one process
    assert _results(run) == _results(reference)
    resumed, one = _weights(run), _weights(reference)
    assert all(torch.equal(resumed[name], one[name]) for name in one)


def test_misconfiguration_is_one_line_on_every_rank_and_writes_nothing(
    corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bad"
    code, log = _torchrun([*_args(corpus, out, 2), "--expert-parallel", "3"])
    assert code != 0
    errors = [line for line in log.splitlines() if line.startswith("hyperrouter: error:")]
    assert len(errors) == 2 and all("--expert-parallel 3 does not divide" in e for e in errors)
    assert 'Traceback (most recent call last):\n  File "/' not in log.split("ChildFailedError")[0]
    assert not out.exists()
    code, log = _torchrun(_args(corpus, out, 2, ["train.batch_size=3", "train.batch_chunk=1"]))
    errors = [line for line in log.splitlines() if line.startswith("hyperrouter: error:")]
    assert code != 0 and len(errors) == 2, log
    assert all("does not split into 2 equal chunks" in e for e in errors)
    assert not out.exists()
    # experts that do not split over the expert-parallel group; a device that is not there
    for extra, flags, message in (
        (
            ["moe.num_experts=3", "eval.top_ks=[1]", "train.top_k_min=1", "train.top_k_max=2"],
            ["--expert-parallel", "2"],
            "divisible",
        ),
        (["train.device=cuda"], [], "CUDA is not available"),
    ):
        if message.startswith("CUDA") and torch.cuda.is_available():
            continue
        code, log = _torchrun([*_args(corpus, out, 2, extra), *flags])
        errors = [line for line in log.splitlines() if line.startswith("hyperrouter: error:")]
        assert code != 0 and len(errors) == 2, log
        assert all(message in e for e in errors), errors
        assert not out.exists()


def test_local_mems_re_split_any_layout() -> None:
    from hyperrouter.train.trainer import Run

    full = [torch.arange(2 * 8 * 3, dtype=torch.float32).view(2, 8, 3) for _ in range(2)]
    state = {f"mems.0.{i}": m for i, m in enumerate(full)}
    run = Run.__new__(Run)
    run.device = torch.device("cpu")
    for world, chunks in ((1, 1), (1, 4), (2, 2), (4, 2)):
        for rank in range(world):
            run.dist = type("D", (), {"rank": rank, "world_size": world})()
            run.global_chunks, run.local_chunks = world * chunks, chunks
            mems = run._local_mems(state, [2])
            width = 8 // (world * chunks)
            for c, layers in enumerate(mems):
                lo = (rank * chunks + c) * width
                for i, m in enumerate(layers):
                    torch.testing.assert_close(m, full[i][:, lo : lo + width])


def test_merge_routing_records_sums_loads_and_averages_the_rest() -> None:
    from hyperrouter.train.trainer import _merge_routing_records

    a = {
        "aux_loss": 1.0,
        "aux_losses": {"balance_loss": 1.0},
        "expert_load": [[1, 2]],
        "router_entropy_by_layer": [0.5],
        "router_entropy": 0.5,
        "dropped_fraction": 0.1,
        "router_stats": {"off_node": [0.2]},
    }
    b = {**a, "aux_loss": 3.0, "aux_losses": {"balance_loss": 1.0, "router_loss": 2.0}}
    b |= {"expert_load": [[3, 4]], "router_entropy_by_layer": [1.5], "dropped_fraction": 0.3}
    merged = _merge_routing_records([a, b])
    assert merged["expert_load"] == [[4, 6]]
    assert merged["aux_loss"] == 2.0
    assert merged["aux_losses"] == {"balance_loss": 1.0, "router_loss": 1.0}
    assert merged["router_entropy"] == 1.0 and merged["dropped_fraction"] == pytest.approx(0.2)
    assert merged["router_stats"] == {"off_node": [pytest.approx(0.2)]}


ROUTER_SCRIPT = """
import json, sys
from hyperrouter import distributed
from hyperrouter.train.config import load_config
from hyperrouter.train.trainer import train_run

corpus, root, settings, CASES = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:5])
distributed.init_from_env("cpu")
for name, options in CASES:
    config = load_config("quick", [*settings, *options, f"data.path={corpus}"])
    train_run(config, f"{root}/{name}", progress=False, log=lambda *_: None)
distributed.shutdown()
"""


def router_cases() -> list[tuple[str, list[str]]]:
    """Every registered router with its defaults, plus state updated once per optimizer step
    from statistics reduced over the ranks (VQMoE's EMA codebook)."""
    from hyperrouter.routers import ROUTERS

    cases = [(name, [f"moe.router={name}"]) for name in sorted(ROUTERS)]
    cases.append(("vqmoe_ema", ["moe.router=vqmoe", "moe.router_options.ema_decay=0.9"]))
    return cases


def test_every_router_trains_on_two_ranks_as_on_one_process(corpus: Path, tmp_path: Path) -> None:
    """All registered routers in one torchrun launch (2 steps each) against one process with the
    same two chunks: the same final parameters (routers with sampling too: per-chunk seeds)."""
    from hyperrouter.train.config import load_config
    from hyperrouter.train.trainer import train_run

    settings = [s for s in SETTINGS if not s.startswith("eval.top_ks")]
    settings += ["train.steps=2", "train.eval_interval=2", "eval.top_ks=[1]"]
    cases = router_cases()
    for name, options in cases:
        config = load_config("quick", [*settings, *options, f"data.path={corpus}"])
        train_run(config, tmp_path / "one" / name, progress=False, log=lambda *_: None)
    script = tmp_path / "every_router.py"
    script.write_text(ROUTER_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [
        str(script),
        str(corpus),
        str(tmp_path / "two"),
        json.dumps(settings),
        json.dumps(cases),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name, _ in cases:
        one, two = _weights(tmp_path / "one" / name), _weights(tmp_path / "two" / name)
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=f"{name}: {key}")


def test_finetune_on_two_ranks_counts_every_test_example(tmp_path: Path, monkeypatch) -> None:
    """`hyperrouter finetune` under torchrun: DDP on halves of each batch, accuracy summed over
    both ranks' examples, one results.json (rank 0)."""
    from hyperrouter.train.config import config_from_dict
    from hyperrouter.train.trainer import train_run
    from tests.test_finetune import separable_task
    from tests.test_train import tiny_config

    corpus = tmp_path / "text.txt"
    corpus.write_bytes(b"a lovely film. a dreadful film. zzz yyy. " * 150)
    config = tiny_config(corpus, train={"steps": 4, "eval_interval": 4})
    train_run(config_from_dict(config), tmp_path / "pre", progress=False, log=lambda _: None)
    data = separable_task(tmp_path / "sst2")
    args = ["finetune", "--task", "sst2", "--data", str(data), "--init", str(tmp_path / "pre")]
    args += ["--out", str(tmp_path / "ft"), "--no-progress"]
    for setting in ("steps=30", "batch_size=8", "lr=0.003", "eval_interval=10", "head_dropout=0"):
        args += ["--set", setting]
    args += ["--set", "test_top_ks=[1,2]", "--set", "clip=1.0", "--set", "device=cpu"]
    args += ["--set", "top_k_min=2", "--set", "top_k_max=2"]
    code, log = _torchrun(args)
    assert code == 0, log
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert set(results["by_top_k"]) == {"1", "2"}
    lines = (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()
    assert sum('"split": "test"' in line for line in lines) == 2  # rank 0 alone wrote
    # 10 test examples split 5 / 5: accuracies are multiples of 1/10, not of 1/5
    assert all(abs(v * 10 - round(v * 10)) < 1e-9 for v in results["by_top_k"].values())
    assert results["by_top_k"]["2"] >= 0.8


def test_expert_parallel_training_matches_one_process_and_saves_every_expert(
    corpus: Path, tmp_path: Path
) -> None:
    """--expert-parallel 2 on 2 ranks (8 experts per rank): the parameters of one process (up to
    the order of the expert gradients' sums), and checkpoints holding all 16 experts, which
    `hyperrouter eval` loads in one process."""
    extra = ["model.dropout=0.0"]  # expert dropout draws on the expert's rank, not the token's
    assert main(_args(corpus, tmp_path / "one", 4, extra)) == 0
    code, log = _torchrun([*_args(corpus, tmp_path / "ep", 4, extra), "--expert-parallel", "2"])
    assert code == 0, log
    one, ep = _weights(tmp_path / "one"), _weights(tmp_path / "ep")
    assert one.keys() == ep.keys()
    for name in one:
        assert ep[name].shape == one[name].shape
        torch.testing.assert_close(ep[name], one[name], rtol=0, atol=2e-4, msg=name)
    for k, value in _results(tmp_path / "one").items():
        assert _results(tmp_path / "ep")[k] == pytest.approx(value, abs=1e-4)
    out = tmp_path / "eval.json"
    assert (
        main(["eval", str(tmp_path / "ep"), "--top-k", "1,2", "--json", str(out), "--no-progress"])
        == 0
    )
    evaluated = json.loads(out.read_text())["by_top_k"]
    for k in ("1", "2"):
        assert evaluated[k] == pytest.approx(_results(tmp_path / "ep")[k], abs=1e-5)


def test_compare_under_torchrun_trains_every_run_on_both_ranks(
    corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    args = ["compare", "--config", "quick", "--data", str(corpus), "--out", str(out)]
    args += ["--methods", "smoe,hash", "--seeds", "1", "--no-progress"]
    for setting in [*SETTINGS, "train.steps=2", "train.eval_interval=2"]:
        args += ["--set", setting]
    code, log = _torchrun(args)
    assert code == 0, log
    assert (out / "table.md").is_file()
    assert log.count("| smoe") == 1  # the table is printed once (rank 0)
    for run in ("smoe-seed1111", "hash-seed1111"):
        assert (out / "runs" / run / "results.json").is_file()
        assert (out / "runs" / run / "analysis" / "analysis.json").is_file()


DRIFT_SCRIPT = """
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
from hyperrouter import distributed
from hyperrouter.moe import expert_parallel
from hyperrouter.train import step, trainer
from hyperrouter.train.config import load_config

corpus, out, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
distributed.init_from_env("cpu", expert_parallel=2)
original_step, original_clip = trainer.training_step, step.clip_grad_norm
drift, norms = [], []

def clip(*args, **kwargs):
    norm = original_clip(*args, **kwargs)
    norms.append(float(norm))
    return norm

def checked(model, *args, **kwargs):
    result = original_step(model, *args, **kwargs)
    skip = expert_parallel.expert_parameter_names(model)
    flat = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if n not in skip])
    every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(every, flat)
    drift.append(max(float((x - every[0]).abs().max()) for x in every))
    return result

step.clip_grad_norm, trainer.training_step = clip, checked
config = load_config("quick", [*settings, f"data.path={corpus}"])
trainer.train_run(config, out, progress=False, log=lambda *_: None)
if dist.get_rank() == 0:
    Path(out, "drift.json").write_text(json.dumps({"drift": drift, "norms": norms}))
distributed.shutdown()
"""

# expert parallel vs one process after DRIFT_STEPS clipped steps at lr 1e-2 (docs/DISTRIBUTED.md):
# the experts' gradients are summed in another order, and Adam can turn a last-bit difference of
# a near-zero gradient into a step of up to lr. Measured 2026-12-06 on this test: 2.3e-5 (AVX-512
# kernels) and 1.8e-5 (ATEN_CPU_CAPABILITY=avx2); the bound leaves a margin of 20x.
DRIFT_STEPS = 20
DRIFT_ATOL = 5e-4


def test_expert_parallel_replicas_stay_identical_under_gradient_clipping(
    corpus: Path, tmp_path: Path
) -> None:
    """2 ranks, expert parallel, clip far below the gradient norm, lr 1e-2 without warm-up: every
    rank clips by the whole model's norm, so the replicated parameters stay bit-identical across
    the ranks after every step, and the model stays close to one process's."""
    settings = [s for s in SETTINGS if not s.startswith("eval.top_ks")]
    settings += ["model.dropout=0.0", "train.clip=0.05", "train.lr=0.01", "train.warmup_steps=0"]
    settings += [f"train.steps={DRIFT_STEPS}", f"train.eval_interval={DRIFT_STEPS}"]
    settings += ["eval.top_ks=[2]"]
    script = tmp_path / "drift.py"
    script.write_text(DRIFT_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(script), str(corpus), str(tmp_path / "ep"), json.dumps(settings)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "ep" / "drift.json").read_text())
    assert len(record["drift"]) == DRIFT_STEPS
    assert min(record["norms"]) > 4 * 0.05  # the clip is active on every step
    assert record["drift"] == [0.0] * DRIFT_STEPS  # replicated weights equal on both ranks
    args = ["train", "--config", "quick", "--data", str(corpus), "--out", str(tmp_path / "one")]
    for setting in settings:
        args += ["--set", setting]
    assert main([*args, "--no-progress"]) == 0
    one, ep = _weights(tmp_path / "one"), _weights(tmp_path / "ep")
    worst = max(float((ep[name] - one[name]).abs().max()) for name in one)
    assert worst <= DRIFT_ATOL, worst


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_by_c10d_rendezvous_train_what_one_process_trains(
    corpus: Path, tmp_path: Path
) -> None:
    """The multi-machine command of docs/DISTRIBUTED.md, executed: two torchrun agents (two
    "machines", one process each) meet at a c10d rendezvous on 127.0.0.1 with --nnodes 2 and
    train the same bits as one process with the same two chunks."""
    args = _args(corpus, tmp_path / "two", 4)
    endpoint = f"127.0.0.1:{_free_port()}"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    launch += ["--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint]
    launch += ["--rdzv-id", "hyperrouter-test", "-m", "hyperrouter", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    logs = []
    try:
        for agent in agents:
            out, err = agent.communicate(timeout=240)
            logs.append((agent.returncode, err + out))
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    assert all(code == 0 for code, _ in logs), logs
    assert main(_args(corpus, tmp_path / "one", 4)) == 0
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(two[name], one[name]), name  # exact: see `one_thread`
