"""Every command block of README.md runs as printed, in a new shell where only the set-up ran.

The ```bash blocks' lines run in order, each through `bash -c` in one temporary folder (the later
ones use the runs the earlier ones made), with an environment a new login shell would have: a
system PATH without the virtual environment, no VIRTUAL_ENV, no PYTHONPATH. The folder holds what
the repository root holds after `bash scripts/setup.sh`: `.venv` (a link to the environment these
tests run in, which the set-up made) and `scripts/`. A command that needs an activated
environment therefore fails here as it would for a user ("command not found", exit 127).

Flags that make each command tiny are appended to it (2 training steps, few tokens; appended
flags win over the README's). Paths under ../shared get small stand-ins in the temporary folder:
the first lines of the real files when ../shared exists, generated text otherwise. The set-up
itself, pytest and downloads (`data get` without --from) are skipped. OMP_NUM_THREADS=1 keeps
two-core machines from thrashing; it changes no result. The ```python blocks run in the same
environment with `.venv/bin/python`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHARED = ROOT.parent / "shared"

# appended to each hyperrouter command (after its own flags, so these win), by subcommand
# (the final test covers the whole test split, so it runs at one k only)
SMALL_RUN = ["--set", "train.steps=2", "--set", "eval.max_valid_batches=2"]
SMALL_RUN += ["--set", "eval.top_ks=[1]"]
SMALL_FINETUNE = ["--set", "steps=2", "--set", "eval_interval=2", "--set", "max_examples=32"]
TINY = {
    "train": [*SMALL_RUN, "--no-progress"],
    "compare": ["--seeds", "1", *SMALL_RUN, "--no-progress"],
    "eval": ["--no-progress"],
    "serve train-policy": [
        *("--max-batch", "2", "--max-tokens", "2", "--prompt-tokens", "8", "--passes", "1"),
        *("--repeats", "1", "--calibrate", "1"),
    ],
    "bench serve": [
        *("--policies", "static:1,learned", "--rates", "5", "--duration", "1", "--max-batch", "2")
    ],
    "adaptive": [
        *("--max-batches", "2", "--top-p", "0.5", "--ratio", "0.2", "--tolerance", "0.05"),
        *("--escalate", "0.5", "--no-progress"),
    ],
    "analyze": ["--tokens", "256"],
    "finetune": [*SMALL_FINETUNE, "--no-progress"],
    "bench": [
        *("--top-k", "1", "--tokens", "64", "--repeats", "1"),
        *("--experts", "relu", "--modes", "infer", "--no-peers"),
    ],
    "bench model": [
        *("--top-k", "1", "--repeats", "1", "--warmup", "0", "--modes", "infer", "--no-dense"),
        *("--set", "eval.batch_size=1", "--set", "eval.tgt_len=16", "--set", "train.tgt_len=16"),
        *("--set", "train.mem_len=16"),
    ],
}
# scripts/table2.py: one task, one seed, no control, tiny fine-tuning runs
TINY_TABLE2 = ["--tasks", "sst2", "--seeds", "1111", "--no-scratch", "--jobs", "1"]
TINY_TABLE2 += [word for pair in zip(SMALL_FINETUNE[::2], SMALL_FINETUNE[1::2]) for word in pair]
LISTING = {"--list-configs", "--help", "-h"}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.S | re.M)


def readme_lines() -> list[list[list[str]]]:
    """Every line of the bash blocks (continuations joined) as its `&&`-separated commands,
    each a list of words."""
    lines = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            commands = []
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:end])
                words = words[end + 1 :]
            if commands:
                lines.append(commands)
    return lines


def _program(words: list[str]) -> tuple[list[str], list[str]]:
    """(VAR=value prefixes, the rest) of a command's words."""
    i = 0
    while i < len(words) and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[i]):
        i += 1
    return words[:i], words[i:]


def hyperrouter_args(words: list[str]) -> list[str] | None:
    """The hyperrouter arguments of a command (`.venv/bin/hyperrouter ARGS`, or `torchrun ... -m
    hyperrouter ARGS`), or None when it runs something else."""
    _, rest = _program(words)
    if not rest:
        return None
    if Path(rest[0]).name == "hyperrouter":
        return rest[1:]
    if Path(rest[0]).name == "torchrun" and "hyperrouter" in rest:
        return rest[rest.index("hyperrouter") + 1 :]
    return None


def tiny(words: list[str]) -> list[str] | None:
    """`words` with the flags that make it tiny, or None for a command this test skips."""
    _, rest = _program(words)
    if not rest or "pytest" in rest or any(Path(w).name == "setup.sh" for w in rest):
        return None  # the set-up (already ran) and the tests themselves
    args = hyperrouter_args(words)
    if args is not None:
        if args[:2] == ["data", "get"] and "--from" not in args:
            return None  # needs the network
        if args[:1] == ["serve"] and args[1:2] != ["train-policy"]:
            return None  # a server runs until stopped (tests/test_serve.py starts it for real)
        if LISTING & set(args):
            return words
        key = " ".join(args[:2]) if " ".join(args[:2]) in TINY else args[0]
        return [*words, *TINY.get(key, [])]
    if any(w.endswith("scripts/table2.py") for w in rest):
        return [*words, *TINY_TABLE2]
    return words


def stand_in(relative: str, where: Path) -> None:
    """A small copy of ../shared/`relative` under `where` (generated if ../shared is absent)."""
    source, target = SHARED / relative, where / "shared" / relative
    if target.exists():
        return
    if "sst" in relative:
        target.mkdir(parents=True)
        for split in ("train", "dev", "test"):
            name = f"stsa.binary.{split}"
            if (source / name).is_file():
                text = "".join((source / name).read_text().splitlines(True)[:200])
            else:
                text = "".join(f"{i % 2} {'good' if i % 2 else 'bad'} film\n" for i in range(80))
            (target / name).write_text(text)
    elif relative.rstrip("/") == "data":
        target.mkdir(parents=True, exist_ok=True)  # a data root: its task folders come below
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_file():
            data = source.read_bytes()[:100_000]
            data = data[: data.rfind(b"\n") + 1] or data
        else:
            data = b"the quick brown fox jumps over the lazy dog.\n" * 2000
        target.write_bytes(data)


def new_shell_env(tmp_path: Path) -> dict[str, str]:
    """What a new login shell has: no virtual environment on PATH or in VIRTUAL_ENV."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "HYPERROUTER_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A folder laid out like the repository root after the set-up: .venv and scripts/."""
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))  # the environment the set-up made
    (work / "scripts").symlink_to(ROOT / "scripts")
    return work


def run_in_new_shell(line: str, cwd: Path, env: dict[str, str], timeout: float = 600):
    return subprocess.run(
        ["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_readme_lists_the_commands_we_expect() -> None:
    commands = [" ".join(hyperrouter_args(c) or []) for line in readme_lines() for c in line]
    assert "train" in commands  # the default job
    for needle in ("--resume", "moe.router=smoe_dropout", "eval ", "compare ", "finetune "):
        assert any(needle in c for c in commands), needle
    torchrun = [c for line in readme_lines() for c in line if "torchrun" in " ".join(c)]
    assert len(torchrun) >= 2


def test_every_readme_command_runs_in_a_new_shell(tmp_path, checkout) -> None:
    env = new_shell_env(tmp_path)
    ran = 0
    for line in readme_lines():
        commands = []
        for words in line:
            for word in words:
                if word.startswith("../shared/"):
                    stand_in(word.removeprefix("../shared/"), tmp_path)
            if any(w.endswith("scripts/table2.py") for w in words):
                stand_in("data/sst_sentences", tmp_path)
            small = tiny(words)
            if small is not None:
                commands.append(shlex.join(small))
        if not commands:
            continue
        text = " && ".join(commands)
        done = run_in_new_shell(text, checkout, env)
        assert done.returncode == 0, f"`{text}` failed ({done.returncode}): {done.stderr[-1500:]}"
        ran += 1
    assert ran >= 15


def test_a_command_that_needs_activation_fails_in_the_new_shell(tmp_path, checkout) -> None:
    """The check above can fail: the bare command name is not found without activation."""
    done = run_in_new_shell("hyperrouter --help", checkout, new_shell_env(tmp_path))
    assert done.returncode == 127, done.stderr


@pytest.mark.parametrize("block", blocks("python"))
def test_readme_python_blocks_run(block: str, tmp_path, checkout) -> None:
    done = subprocess.run(
        [".venv/bin/python", "-"],
        input=block,
        cwd=checkout,
        env=new_shell_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
