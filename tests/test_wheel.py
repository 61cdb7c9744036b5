"""The built wheel is a complete install: every preset and data asset ships, and works from it.

Builds a wheel from a copy of the checkout (offline, with the setuptools the dev environment has),
installs it with pip --no-index into a fresh virtual environment that borrows this environment's
dependencies (torch, numpy, ...) through a .pth file, and runs it from a temporary folder so that
nothing can come from the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "hyperrouter"
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")

# Run inside the fresh environment: load every preset through the config loader and the built-in
# corpus through the corpus loader; report where each came from.
PROBE = """
import json, sys
import hyperrouter
from hyperrouter.data.builtin import NAME
from hyperrouter.data.corpus import load_corpus
from hyperrouter.train.config import list_presets, load_config
from hyperrouter.train.finetune import load_finetune_config

train = {name: load_config(name).name for name in list_presets("train")}
finetune = {name: load_finetune_config(name).name for name in list_presets("finetune")}
corpus = load_corpus(None, cache_dir=False)
json.dump({
    "file": hyperrouter.__file__,
    "train": train,
    "finetune": finetune,
    "corpus": [corpus.name, len(corpus.train), len(corpus.valid), len(corpus.test)],
    "builtin_name": NAME,
}, sys.stdout)
"""


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def _source_presets(kind: str) -> set[str]:
    folder = PACKAGE / "configs" / ("" if kind == "train" else kind)
    return {p.stem for p in folder.glob("*.yaml")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build the wheel, install it into a fresh venv; paths, environment and the wheel's files."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools (dev extra)")
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=IGNORE)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PIP_NO_CACHE_DIR="1")
    env["HYPERROUTER_CACHE"] = str(tmp / "cache")
    work = tmp / "cwd"
    work.mkdir()
    dist = tmp / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["-q", "-w", str(dist), str(source)],
        work,
        env,
    )
    (wheel,) = dist.glob("hyperrouter-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], work, env)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], work, env
    )
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (Path(site.strip()) / "_borrowed_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    # pip itself is borrowed too; it installs into sys.prefix, the fresh venv
    _run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        work,
        env,
    )
    with zipfile.ZipFile(wheel) as zf:
        files = set(zf.namelist())
    return {"venv": venv, "python": python, "env": env, "cwd": work, "files": files, "src": source}


def test_wheel_has_every_package_file(installed):
    """Every file of the package tree (code, presets, assets) is in the wheel."""
    package = installed["src"] / "src"
    expected = {p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()}
    expected = {f for f in expected if f.startswith("hyperrouter/")}
    missing = sorted(expected - installed["files"])
    assert not missing, f"the wheel lacks {missing}; extend [tool.setuptools.package-data]"


def test_installed_wheel_works(installed):
    venv, env, cwd = installed["venv"], installed["env"], installed["cwd"]
    out = json.loads(_run([str(installed["python"]), "-c", PROBE], cwd, env))
    assert Path(out["file"]).resolve().is_relative_to(venv.resolve()), out["file"]
    assert set(out["train"]) == _source_presets("train")
    assert set(out["finetune"]) == _source_presets("finetune")
    name, n_train, n_valid, n_test = out["corpus"]
    assert name == out["builtin_name"] and min(n_train, n_valid, n_test) > 0

    script = venv / ("Scripts/hyperrouter.exe" if os.name == "nt" else "bin/hyperrouter")
    assert "train" in _run([str(script), "--help"], cwd, env)
    for kind in ("train", "finetune"):
        listing = _run([str(script), kind, "--list-configs"], cwd, env)
        listed = {line.split()[0] for line in listing.splitlines() if line.strip()}
        assert listed == _source_presets(kind), kind
