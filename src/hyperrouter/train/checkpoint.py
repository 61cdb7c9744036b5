"""Checkpoints: safetensors weights + JSON config and trainer state, written atomically.

A run directory keeps immutable checkpoint folders `checkpoints/step-NNNNNNN/` and one index file
`checkpoints/index.json` naming which folder is `latest`, `best_all_experts` and `best_train_k`.
A folder is written under a temporary name and renamed into place; the index is replaced with
os.replace after it. A run killed at any moment therefore leaves the previous index pointing at
complete folders, and `--resume` continues from there.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from hyperrouter.errors import HyperRouterError

INDEX = "index.json"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
TRAINER_FILE = "trainer.json"
STATE_FILE = "trainer_state.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file in the same folder, fsync it, then os.replace it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise HyperRouterError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HyperRouterError(f"{path} is not valid JSON (truncated or corrupt?)") from None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    config: dict[str, Any],
    vocab: dict[str, Any],
    trainer: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    state_tensors: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write checkpoint folder `step-NNNNNNN` atomically; returns its name (index not touched)."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    final = root / name
    if final.exists():
        return name
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".tmp"))
    try:
        save_model(model, str(tmp / MODEL_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        (tmp / VOCAB_FILE).write_text(json.dumps(vocab) + "\n")
        meta: dict[str, Any] = {"step": step, "trainer": trainer or {}}
        if optimizer is not None:
            tensors, meta["optimizer"] = _optimizer_tensors(optimizer)
            save_file(tensors, str(tmp / OPTIMIZER_FILE))
        if state_tensors:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in state_tensors.items()},
                str(tmp / STATE_FILE),
            )
        (tmp / TRAINER_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return name


def read_index(run_dir: Path) -> dict[str, str]:
    path = run_dir / "checkpoints" / INDEX
    return read_json(path) if path.exists() else {}


def update_index(run_dir: Path, **pointers: str) -> dict[str, str]:
    """Point names (latest, best_all_experts, ...) at checkpoint folders; drop unreferenced ones."""
    root = run_dir / "checkpoints"
    index = read_index(run_dir) | pointers
    write_json_atomic(root / INDEX, index)
    keep = set(index.values())
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith("step-") and entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(".step-") and entry.name.endswith(".tmp"):
            shutil.rmtree(entry, ignore_errors=True)  # left by a killed run
    return index


def run_folder(path: str | os.PathLike) -> Path:
    """The run folder of `path`: a run folder itself, or the run that holds a checkpoint folder
    (RUN/checkpoints/NAME)."""
    p = Path(path)
    return p if (p / "checkpoints").is_dir() else p.parent.parent


def resolve_checkpoint(path: str | os.PathLike, which: str = "best_all_experts") -> Path:
    """A checkpoint folder from a run dir (via its index) or a checkpoint folder itself."""
    p = Path(path)
    if not p.exists():
        raise HyperRouterError(f"{p} does not exist")
    if (p / MODEL_FILE).is_file():
        return p
    index_path = p / "checkpoints" / INDEX
    if not index_path.is_file():
        raise HyperRouterError(
            f"{p} is neither a hyperrouter run directory nor a checkpoint folder "
            f"(no checkpoints/{INDEX} or {MODEL_FILE})"
        )
    index = read_json(index_path)
    name = index.get(which) or index.get("latest")
    if name is None:
        raise HyperRouterError(f"{index_path} names no checkpoint")
    folder = p / "checkpoints" / name
    if not (folder / MODEL_FILE).is_file():
        raise HyperRouterError(f"checkpoint folder {folder} is missing or incomplete")
    return folder


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load model.safetensors into `model` strictly, with one-line errors for bad files: a file
    whose tensors disagree with the model (built from the checkpoint's config.json) is named with
    the first tensors that disagree and both shapes."""
    path = folder / MODEL_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except SafetensorError as err:
        raise HyperRouterError(f"{path} is truncated or corrupt ({err})") from None
    except FileNotFoundError:
        raise HyperRouterError(f"{path} does not exist") from None
    wrong = [
        f"{name} is {stored[name]} in the file but {list(tensor.shape)} in the model"
        for name, tensor in model.state_dict().items()
        if name in stored and stored[name] != list(tensor.shape)
    ]
    if wrong:
        more = f" (and {len(wrong) - 2} more)" if len(wrong) > 2 else ""
        raise HyperRouterError(
            f"{path} does not match the model its config.json describes: "
            f"{'; '.join(wrong[:2])}{more}"
        )
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except SafetensorError as err:
        raise HyperRouterError(f"{path} is truncated or corrupt ({err})") from None
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        raise HyperRouterError(f"{path} does not match the model: {first}") from None
    except FileNotFoundError:
        raise HyperRouterError(f"{path} does not exist") from None
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {', '.join(sorted(missing)[:3])}")
        if unexpected:
            detail.append(f"unexpected {', '.join(sorted(unexpected)[:3])}")
        raise HyperRouterError(f"{path} does not match the model: {'; '.join(detail)}")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise HyperRouterError(f"{path} is truncated or corrupt ({err})") from None
    except FileNotFoundError:
        raise HyperRouterError(f"{path} does not exist") from None


def optimizer_state(folder: Path, meta: dict) -> dict[str, Any]:
    """The optimizer.state_dict() stored in a checkpoint folder (to load into any optimizer over
    the same parameters, or into an expert-parallel one with its own loader)."""
    if "optimizer" not in meta:
        raise HyperRouterError(f"checkpoint {folder} has no optimizer state to resume from")
    tensors = load_tensors(folder / OPTIMIZER_FILE)
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["optimizer"]["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["optimizer"]["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, folder: Path, meta: dict) -> None:
    if "optimizer" not in meta:
        raise HyperRouterError(f"checkpoint {folder} has no optimizer state to resume from")
    tensors = load_tensors(folder / OPTIMIZER_FILE)
    try:
        _restore_optimizer(optimizer, tensors, meta["optimizer"])
    except (ValueError, KeyError, RuntimeError) as err:
        raise HyperRouterError(
            f"optimizer state in {folder} does not fit the model: {err}"
        ) from None
