"""`load_pretrained`: the way back from `save_pretrained` for a model with hyperrouter routers.

`save_pretrained` writes the whole state dict, the adapters' and upcycled layers' tensors
included, and the config with its `hyperrouter` record. Loading runs the model class's own
`from_pretrained` (which converts the transformers tensors from their checkpoint layout, e.g.
Mixtral's per-expert w1/w2/w3 and `block_sparse_moe` names), redoes the recorded changes, then
reads the integration's tensors from the safetensors under the names `save_pretrained` gave them
(transformers' own reverse conversion of the model's names, so renamed blocks are found too).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from hyperrouter.errors import HyperRouterError
from hyperrouter.integrations.transformers._common import CONFIG_KEY, require_transformers
from hyperrouter.integrations.transformers.hosts import HyperRouterModule
from hyperrouter.integrations.transformers.routers import replace_routers
from hyperrouter.integrations.transformers.upcycle import upcycle


def load_pretrained(path: str | Path, **from_pretrained_kwargs: Any) -> nn.Module:
    """Rebuild a model saved with `save_pretrained` after `replace_routers` and/or `upcycle`:
    its class's `from_pretrained(path)`, the recorded changes, and the routers' saved state.
    Keyword arguments go to `from_pretrained` (e.g. `torch_dtype`, `device_map`)."""
    tf = require_transformers()
    path = Path(path)
    config = tf.AutoConfig.from_pretrained(path)
    rec = getattr(config, CONFIG_KEY, None)
    if not isinstance(rec, dict) or not ({"routers", "upcycle"} & set(rec)):
        raise HyperRouterError(
            f"{path}/config.json has no hyperrouter record: save a model changed by "
            f"replace_routers or upcycle with save_pretrained, or load it with from_pretrained"
        )
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(tf, architectures[0], None) if architectures else None
    if model_class is None:
        raise HyperRouterError(
            f"{path}/config.json names no transformers model class (architectures="
            f"{architectures!r})"
        )
    with _quiet(tf):  # the integration's tensors are "unexpected" to the class: read below
        model = model_class.from_pretrained(path, config=config, **from_pretrained_kwargs)
    if "upcycle" in rec:
        up = dict(rec["upcycle"])
        upcycle(model, **up.pop("options", {}), **up)
    if "routers" in rec:
        routers = dict(rec["routers"])
        replace_routers(model, init="random", **routers.pop("options", {}), **routers)
    _load_module_state(model, path)
    return model


def _load_module_state(model: nn.Module, path: Path) -> None:
    """The integration's modules' tensors from the safetensors in `path`."""
    wanted: dict[str, tuple[nn.Module, str]] = {}  # saved name -> (module, its state key)
    for prefix, module in model.named_modules():
        if not isinstance(module, HyperRouterModule):
            continue
        for key, tensor in module.state_dict().items():
            wanted[_saved_name(model, f"{prefix}.{key}" if prefix else key, tensor)] = (module, key)
    tensors = _read(path, set(wanted))
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise HyperRouterError(
            f"{path} lacks {len(missing)} hyperrouter tensor(s) the recorded model has, e.g. "
            f"{missing[0]}: was it saved with save_pretrained after the same changes?"
        )
    states: dict[nn.Module, dict[str, Tensor]] = {}
    for name, (module, key) in wanted.items():
        states.setdefault(module, {})[key] = tensors[name]
    for module, state in states.items():
        module.load_state_dict(state, strict=True)


def _saved_name(model: nn.Module, name: str, tensor: Tensor) -> str:
    """The name save_pretrained gives the tensor `name` (transformers' reverse key conversion)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return name
    return next(iter(revert_weight_conversion(model, {name: tensor})))


def _read(path: Path, names: set[str]) -> dict[str, Tensor]:
    from safetensors import safe_open

    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        files = [single]
    elif index.exists():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        raise HyperRouterError(f"{path} has no model.safetensors (or its index)")
    found: dict[str, Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in names & set(f.keys()):
                found[name] = f.get_tensor(name)
    return found


@contextlib.contextmanager
def _quiet(tf: ModuleType) -> Iterator[None]:
    """transformers' load report and progress bar off for the duration."""
    logging = tf.utils.logging
    level, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()
