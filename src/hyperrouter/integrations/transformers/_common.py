"""What the parts of the transformers integration share: the lazy import of transformers and the
record of what was changed, kept in the model's config so that `save_pretrained` writes it and
`load_pretrained` can redo it."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

from torch import nn

from hyperrouter.errors import HyperRouterError

SETUP_HINT = "bash scripts/setup.sh hf"
# config.json key of the record: {"routers": {...replace_routers arguments}, "upcycle": {...}}
CONFIG_KEY = "hyperrouter"


def require_transformers() -> ModuleType:
    """transformers (>= 5: MoE blocks whose router is a module of its own), or a one-line error."""
    try:
        import transformers
    except ImportError:
        raise HyperRouterError(f"transformers is not installed: run `{SETUP_HINT}`") from None
    version = str(getattr(transformers, "__version__", "0"))
    major = version.split(".")[0]
    if not major.isdigit() or int(major) < 5:
        raise HyperRouterError(
            f"hyperrouter's transformers integration needs transformers >= 5 (MoE blocks with a "
            f"router module), found {version}: run `{SETUP_HINT}`"
        )
    return transformers


def record(model: nn.Module) -> dict[str, Any]:
    """The integration's record in the model's config ({} when nothing was changed)."""
    config = getattr(model, "config", None)
    value = getattr(config, CONFIG_KEY, None)
    return dict(value) if isinstance(value, dict) else {}


def set_record(model: nn.Module, key: str, value: dict[str, Any]) -> None:
    """Store `value` under `key` in the model's config record (a no-op without a config)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    updated = record(model)
    updated[key] = value
    setattr(config, CONFIG_KEY, updated)


def check_json(what: str, options: dict[str, Any]) -> None:
    """Options are saved in config.json: reject values JSON cannot hold, in one line."""
    for name, value in options.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise HyperRouterError(
                f"{what} option {name}={value!r} is not a JSON value, so save_pretrained could "
                f"not record it; pass numbers, strings, booleans, lists or dicts"
            ) from None


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HyperRouterError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_top_k(value: object, num_experts: int, what: str = "top_k") -> int:
    """k in [1, E], or a one-line error naming E."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_experts:
        raise HyperRouterError(f"{what} must be an integer in [1, {num_experts}], got {value!r}")
    return value
