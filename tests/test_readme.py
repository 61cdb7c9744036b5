"""Every command block of README.md runs as written, so the README cannot drift from the code.

The ```bash blocks' `hyperrouter` commands run in order in one temporary folder (the later ones use
the runs the earlier ones made), in-process through `hyperrouter.cli.main`, with flags appended
that make them tiny (2 training steps, few tokens; appended flags win over the README's). Paths
under ../shared are given small stand-ins in the temporary folder: the first lines of the real
files when ../shared exists, generated text otherwise. Installing (scripts/setup.sh), pytest and
downloads (`data get` without --from) are skipped. The ```python blocks are executed.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from hyperrouter.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHARED = ROOT.parent / "shared"

# appended to each command (after its own flags, so these win), by subcommand
# (the final test covers the whole test split, so it runs at one k only)
SMALL_RUN = [
    "--set",
    "train.steps=2",
    "--set",
    "eval.max_valid_batches=2",
    "--set",
    "eval.top_ks=[1]",
]
TINY = {
    "train": [*SMALL_RUN, "--no-progress"],
    "compare": ["--seeds", "1", *SMALL_RUN, "--no-progress"],
    "eval": ["--no-progress"],
    "analyze": ["--tokens", "256"],
    "finetune": [
        *("--set", "steps=2", "--set", "eval_interval=2", "--set", "max_examples=32"),
        "--no-progress",
    ],
    "bench": [
        *("--top-k", "1", "--tokens", "64", "--repeats", "1"),
        *("--experts", "relu", "--modes", "infer", "--no-peers"),
    ],
}
LISTING = {"--list-configs", "--help", "-h"}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.S | re.M)


def readme_commands() -> list[list[str]]:
    """The `hyperrouter` commands of the bash blocks, as argument lists without the program."""
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                command, words = words[:end], words[end + 1 :]
                if command and Path(command[0]).name == "hyperrouter":
                    commands.append(command[1:])
    return commands


def readme_torchrun_commands() -> list[list[str]]:
    """The `torchrun ... -m hyperrouter ...` commands of the bash blocks: torchrun's options,
    then the hyperrouter arguments (after `-m hyperrouter`)."""
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and "=" in words[0]:  # VAR=value prefixes
                words = words[1:]
            if words and words[0] == "torchrun" and "hyperrouter" in words:
                cut = words.index("hyperrouter")
                commands.append([*words[1 : cut - 1], "--", *words[cut + 1 :]])
    return commands


def tiny(args: list[str]) -> list[str] | None:
    """`args` with the flags that make it tiny, or None for a command this test skips."""
    if args[:2] == ["data", "get"] and "--from" not in args:
        return None  # needs the network
    if LISTING & set(args):
        return args
    return [*args, *TINY.get(args[0], [])]


def stand_in(relative: str, where: Path) -> None:
    """A small copy of ../shared/`relative` under `where` (generated if ../shared is absent)."""
    source, target = SHARED / relative, where / "shared" / relative
    if target.exists():
        return
    if source.is_dir() or (not source.exists() and "sst" in relative):
        target.mkdir(parents=True)
        for split in ("train", "dev", "test"):
            name = f"stsa.binary.{split}"
            if (source / name).is_file():
                text = "".join((source / name).read_text().splitlines(True)[:200])
            else:
                text = "".join(f"{i % 2} {'good' if i % 2 else 'bad'} film\n" for i in range(80))
            (target / name).write_text(text)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_file():
            data = source.read_bytes()[:100_000]
            data = data[: data.rfind(b"\n") + 1] or data
        else:
            data = b"the quick brown fox jumps over the lazy dog.\n" * 2000
        target.write_bytes(data)


def test_readme_lists_the_commands_we_expect() -> None:
    commands = [" ".join(c) for c in readme_commands()]
    assert "train" in commands  # the default job
    for needle in ("--resume", "moe.router=smoe_dropout", "eval ", "compare ", "finetune "):
        assert any(needle in c for c in commands), needle


@pytest.fixture
def one_thread():
    """One torch thread: on a busy 2-core machine two spinning threads per process cost ten
    times the time of one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_readme_command_runs(tmp_path, monkeypatch, capsys, one_thread) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HYPERROUTER_CACHE", str(tmp_path / "cache"))
    ran = 0
    for args in readme_commands():
        for word in args:
            if word.startswith("../shared/"):
                stand_in(word.removeprefix("../shared/"), tmp_path)
        argv = tiny(args)
        if argv is None:
            continue
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 0, f"`hyperrouter {' '.join(args)}` failed: {err.strip()[-500:]}"
        ran += 1
    assert ran >= 10


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)
@pytest.mark.parametrize("command", readme_torchrun_commands(), ids=lambda c: " ".join(c[-4:]))
def test_readme_torchrun_commands_run(command: list[str], tmp_path) -> None:
    import os
    import subprocess
    import sys

    cut = command.index("--")
    launcher, args = command[:cut], command[cut + 1 :]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "hyperrouter"]
    cmd += tiny(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYPERROUTER_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]


def test_readme_shows_torchrun() -> None:
    assert len(readme_torchrun_commands()) >= 2


@pytest.mark.parametrize("block", blocks("python"))
def test_readme_python_blocks_run(block: str) -> None:
    exec(compile(block, str(README), "exec"), {})
