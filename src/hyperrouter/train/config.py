"""Run configuration: nested dataclasses, YAML presets, `--set a.b=value` overrides.

One source of truth per hyperparameter: the dataclass default. Presets (src/hyperrouter/configs)
only state what differs, and may name a `base` preset to start from. Unknown keys are rejected with
a suggestion; values are checked against the field types.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hyperrouter.errors import HyperRouterError
from hyperrouter.models.transformer_xl import ARCHS, ModelConfig, MoEConfig, TransformerXL
from hyperrouter.moe.schedules import ELASTIC_SCHEDULES, VALID_SCHEDULES, top_k_at

if TYPE_CHECKING:
    from hyperrouter.models.decoder import Qwen3Decoder


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1), plus numbers as people type them: YAML 1.1 reads `1e-3`
    and `5E4` as strings (it wants `1.0e-3`); here they are floats, as in YAML 1.2. `1_000` is
    already an int."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """YAML text -> Python values, reading numbers as people type them (`YamlLoader`)."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class DataConfig:
    """Where the text comes from. path None means the built-in corpus (tiny Shakespeare). kind:
    auto, char, word or bpe (`hyperrouter.data.corpus`); vocab_size: the symbols of the byte-level
    BPE tokenizer trained on the training split for kind bpe (unused by the other kinds)."""

    path: str | None = None
    kind: str = "auto"
    vocab_size: int = 1024


@dataclass
class TrainConfig:
    """Optimisation and the progressive top-k schedule (paper: linear_increase 8 -> 16)."""

    steps: int = 400_000
    batch_size: int = 22
    batch_chunk: int = 1
    tgt_len: int = 512
    mem_len: int = 512
    lr: float = 2.5e-4
    lr_min: float = 0.0
    warmup_steps: int = 0
    clip: float = 0.25
    weight_decay: float = 0.0
    # divergence guard: stop when the training loss stays above divergence_factor x ln(vocabulary
    # size) (a uniform guess, about where every run starts) for divergence_steps steps; 0 = off
    divergence_factor: float = 2.0
    divergence_steps: int = 20
    seed: int = 1111
    top_k_schedule: str = "linear_increase"
    top_k_min: int = 8
    top_k_max: int = 16
    # elastic-k schedules (random_uniform, random_pow2): one draw per MoE layer per step (true) or
    # one draw per step for every layer (false)
    top_k_per_layer: bool = False
    schedule_steps: int | None = None
    log_interval: int = 200
    eval_interval: int = 4000
    device: str = "auto"
    amp: str = "none"
    # start from another run's weights, its dense FFNs upcycled into this run's MoE layers
    # (hyperrouter.train.upcycle); init_noise: relative Gaussian noise on the expert copies
    init_from: str | None = None
    init_noise: float = 0.0


@dataclass
class EvalConfig:
    """Evaluation segments (paper: eval_tgt_len 128) and the inference k values reported."""

    tgt_len: int = 128
    batch_size: int = 10
    top_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    max_valid_batches: int | None = None


@dataclass
class RunConfig:
    """Everything that defines a training run."""

    name: str = "custom"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def train_top_k(self, step: int, layer: int = 0) -> int:
        """k the training schedule uses at `step` (held at its final value after it ends); for
        an elastic-k schedule the draw of MoE layer `layer` (0: the draw every layer shares)."""
        t = self.train
        total = t.schedule_steps or t.steps
        if t.top_k_schedule in ELASTIC_SCHEDULES:
            step = min(step, total)
            return top_k_at(
                t.top_k_schedule, step, total, t.top_k_min, t.top_k_max, seed=t.seed, layer=layer
            )
        return top_k_at(t.top_k_schedule, min(step, total), total, t.top_k_min, t.top_k_max)

    def train_top_ks(self, step: int, n_layers: int) -> int | list[int]:
        """k for every MoE layer at `step`: one int, or one per layer (elastic per-layer draws)."""
        t = self.train
        if t.top_k_per_layer and t.top_k_schedule in ELASTIC_SCHEDULES:
            return [self.train_top_k(step, layer + 1) for layer in range(n_layers)]
        return self.train_top_k(step)

    @property
    def elastic(self) -> bool:
        """True when the training k is drawn at random (an elastic-k schedule)."""
        return self.train.top_k_schedule in ELASTIC_SCHEDULES

    def final_top_k(self) -> int:
        """The k training ended at (the largest k an elastic-k schedule draws)."""
        if self.train.top_k_schedule in ELASTIC_SCHEDULES:
            return self.train.top_k_max
        return self.train_top_k(self.train.steps)

    def build_model(self, n_token: int) -> TransformerXL | Qwen3Decoder:
        """The model this config describes (model.arch), at the schedule's first k."""
        moe = self.moe if self.moe.layers else None
        if self.model.arch == "qwen3":
            from hyperrouter.models.decoder import Qwen3Decoder

            return Qwen3Decoder(
                n_token,
                self.model,
                moe,
                max_len=max(self.train.tgt_len, self.eval.tgt_len),
                top_k=self.train_top_k(0) if moe is not None else None,
            )
        return TransformerXL(
            n_token,
            self.model,
            moe,
            tgt_len=self.train.tgt_len,
            mem_len=self.train.mem_len,
            top_k=self.train_top_k(0) if moe is not None else None,
        )

    def validate(self) -> RunConfig:
        """Reject bad combinations early with a message saying what to change."""
        t, m, e, moe = self.train, self.model, self.eval, self.moe
        positive = {
            "train.steps": t.steps,
            "train.batch_size": t.batch_size,
            "train.tgt_len": t.tgt_len,
            "train.log_interval": t.log_interval,
            "train.eval_interval": t.eval_interval,
            "eval.tgt_len": e.tgt_len,
            "eval.batch_size": e.batch_size,
            "model.n_layer": m.n_layer,
            "model.n_head": m.n_head,
            "model.d_head": m.d_head,
            "model.d_model": m.d_model,
            "model.d_inner": m.d_inner,
            "moe.num_experts": moe.num_experts,
            "moe.d_expert": moe.d_expert,
        }
        for name, value in positive.items():
            if value < 1:
                raise HyperRouterError(f"{name} must be >= 1, got {value}")
        if not e.top_ks:
            raise HyperRouterError("eval.top_ks must list at least one k, e.g. [1, 2, 4, 8, 16]")
        if t.batch_chunk < 1 or t.batch_size % t.batch_chunk:
            raise HyperRouterError(
                f"train.batch_chunk must divide train.batch_size={t.batch_size}, "
                f"got {t.batch_chunk}"
            )
        if t.mem_len < 0:
            raise HyperRouterError(f"train.mem_len must be >= 0, got {t.mem_len}")
        for name, value in (("model.dropout", m.dropout), ("model.dropatt", m.dropatt)):
            if not 0.0 <= value < 1.0:
                raise HyperRouterError(f"{name} must be in [0, 1), got {value}")
        if t.lr <= 0:
            raise HyperRouterError(f"train.lr must be > 0, got {t.lr}")
        if not 0 <= t.lr_min <= t.lr:
            raise HyperRouterError(
                f"train.lr_min must be in [0, train.lr={t.lr:g}], got {t.lr_min:g}"
            )
        for name, value in (
            ("train.warmup_steps", t.warmup_steps),
            ("train.clip", t.clip),
            ("train.weight_decay", t.weight_decay),
        ):
            if value < 0:
                raise HyperRouterError(f"{name} must be >= 0 (0 turns it off), got {value:g}")
        if e.max_valid_batches is not None and e.max_valid_batches < 1:
            raise HyperRouterError(
                f"eval.max_valid_batches must be >= 1 or null (the whole split), "
                f"got {e.max_valid_batches}"
            )
        if t.divergence_factor != 0 and t.divergence_factor <= 1:
            raise HyperRouterError(
                f"train.divergence_factor must be > 1 (or 0 to turn the guard off), "
                f"got {t.divergence_factor}"
            )
        if t.divergence_steps < 1:
            raise HyperRouterError(f"train.divergence_steps must be >= 1, got {t.divergence_steps}")
        if t.top_k_schedule not in VALID_SCHEDULES:
            raise HyperRouterError(
                f"unknown train.top_k_schedule {t.top_k_schedule!r}; "
                f"valid: {', '.join(VALID_SCHEDULES)}"
            )
        for name in ("constant_experts", "copy_experts", "zero_experts"):
            value = getattr(moe, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise HyperRouterError(f"moe.{name} must be an integer >= 0, got {value!r}")
        if moe.layers:
            experts = moe.total_experts
            label = f"moe.num_experts={experts}"
            if moe.granularity > 1:
                label = f"moe.num_experts * moe.granularity={experts}"
            if experts != moe.num_experts * moe.granularity:
                label = f"the FFN and zero-computation experts={experts}"
            if not 1 <= t.top_k_min <= t.top_k_max <= experts:
                raise HyperRouterError(
                    f"the top-k schedule needs 1 <= train.top_k_min <= train.top_k_max <= "
                    f"{label}, got {t.top_k_min} and {t.top_k_max}"
                )
            too_big = [k for k in e.top_ks if k > experts or k < 1]
            if too_big:
                raise HyperRouterError(f"eval.top_ks must be in [1, {label}], got {too_big}")
        if t.device not in ("auto", "cpu", "cuda") and not t.device.startswith("cuda:"):
            raise HyperRouterError(f"train.device must be auto, cpu or cuda, got {t.device!r}")
        if not t.init_noise >= 0:
            raise HyperRouterError(f"train.init_noise must be >= 0, got {t.init_noise}")
        if t.amp not in ("none", "bf16"):
            raise HyperRouterError(f"train.amp must be none or bf16, got {t.amp!r}")
        if self.data.kind not in ("auto", "char", "word", "bpe"):
            raise HyperRouterError(
                f"data.kind must be auto, char, word or bpe, got {self.data.kind!r}"
            )
        if self.data.kind == "bpe" and self.data.vocab_size < 257:
            raise HyperRouterError(
                f"data.vocab_size must be >= 257 for data.kind bpe (the 256 byte symbols and at "
                f"least one merge), got {self.data.vocab_size}"
            )
        self._validate_arch()
        return self

    def _validate_arch(self) -> None:
        """model.arch is known, and the keys of the other architecture keep their defaults."""
        m = self.model
        if m.arch not in ARCHS:
            raise HyperRouterError(f"unknown model.arch {m.arch!r}; valid: {', '.join(ARCHS)}")
        defaults = ModelConfig()
        others = QWEN3_ONLY if m.arch == "transformer_xl" else TRANSFORMER_XL_ONLY
        for key in others:
            if getattr(m, key) != getattr(defaults, key):
                owner = "qwen3" if key in QWEN3_ONLY else "transformer_xl"
                raise HyperRouterError(
                    f"model.{key} is a model.arch {owner} setting but model.arch is {m.arch}: "
                    f"remove it or set model.arch={owner}"
                )
        if m.arch != "qwen3":
            return
        if self.train.mem_len != 0:
            raise HyperRouterError(
                f"model.arch qwen3 keeps no recurrence memory: set train.mem_len=0 "
                f"(got {self.train.mem_len})"
            )
        kv = m.n_kv_head if m.n_kv_head is not None else m.n_head
        if kv < 1 or m.n_head % kv:
            raise HyperRouterError(
                f"model.n_kv_head must divide model.n_head={m.n_head}, got {m.n_kv_head}"
            )
        for name, value in (
            ("model.rope_theta", m.rope_theta),
            ("model.rms_norm_eps", m.rms_norm_eps),
        ):
            if value <= 0:
                raise HyperRouterError(f"{name} must be > 0, got {value:g}")


# model keys that only one architecture reads (`ModelConfig`)
QWEN3_ONLY = ("n_kv_head", "rope_theta", "rms_norm_eps")
TRANSFORMER_XL_ONLY = (
    "d_embed",
    "adaptive",
    "cutoffs",
    "div_val",
    "tie_projs",
    "same_length",
    "clamp_len",
    "proj_init_std",
)


def check_top_ks(ks, experts: int, name: str) -> None:
    """Every list of k values is checked alike: not empty, each in [1, experts]."""
    if not ks:
        raise HyperRouterError(f"{name} must list at least one k")
    bad = [k for k in ks if not 1 <= k <= experts]
    if bad:
        raise HyperRouterError(f"{name} must be in [1, {experts}] (experts per layer), got {bad}")


# --------------------------------------------------------------------------- building from dicts


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(valid)}"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert a YAML value to the field's type; raise a one-line error if it does not fit."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except HyperRouterError as err:
                errors.append(str(err))
        raise HyperRouterError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise HyperRouterError(f"{where} must be a mapping, got {value!r}")
        return _from_dict(annotation, value, where)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise HyperRouterError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise HyperRouterError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise HyperRouterError(f"{where} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise HyperRouterError(f"{where} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise HyperRouterError(f"{where} must be a finite number, got {value!r}")
            return float(value)
        raise HyperRouterError(f"{where} must be a number (e.g. 0.001, 1e-3), got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise HyperRouterError(f"{where} must be a string, got {value!r}")
    return value


def _from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in types_:
            raise HyperRouterError(f"unknown config key {path!r}{_suggest(key, list(types_))}")
        kwargs[key] = _coerce(value, types_[key], path)
    return cls(**kwargs)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "router_options":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    if "router" in override and "router_options" not in override:
        _forget_router_options(out, base.get("router", DEFAULT_ROUTER))
    return out


DEFAULT_ROUTER = MoEConfig().router


def _forget_router_options(section: dict[str, Any], old_router: str) -> None:
    """Router options belong to the router they were given for: a section that switches to
    another router without giving options of its own drops the inherited ones (a preset's
    `hyper_hidden` means nothing to `smoe_dropout`)."""
    if section.get("router", DEFAULT_ROUTER) != old_router and section.get("router_options"):
        section["router_options"] = {}


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and ill-typed values."""
    return _from_dict(cls, data)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A validated RunConfig from a (possibly partial) nested dict.

    Accepts the config.json of runs made before k lived only in the schedule: their `moe.top_k`
    was never used (the schedule set k) and is dropped.
    """
    data = drop_legacy_keys(data)
    return _from_dict(RunConfig, data).validate()


LEGACY_TOP_K = (
    "moe.top_k is not a setting (k lives in the schedule): set the training k with "
    "train.top_k_min and train.top_k_max (train.top_k_schedule=constant for a fixed k) and the "
    "evaluated k values with eval.top_ks"
)


def _reject_legacy_top_k(raw: dict[str, Any], where: str) -> None:
    """A user asking for `moe.top_k` today would be ignored (old run folders may hold it)."""
    moe = raw.get("moe")
    if isinstance(moe, dict) and "top_k" in moe:
        raise HyperRouterError(f"{where}: {LEGACY_TOP_K}")


def drop_legacy_keys(data: dict[str, Any]) -> dict[str, Any]:
    """Remove keys older versions wrote that no longer mean anything (moe.top_k)."""
    moe = data.get("moe")
    if isinstance(moe, dict) and "top_k" in moe:
        data = {**data, "moe": {k: v for k, v in moe.items() if k != "top_k"}}
    return data


# --------------------------------------------------------------------------- presets


PRESET_KINDS = ("train", "finetune")


def _preset_dir(kind: str = "train") -> Path:
    root = Path(str(resources.files("hyperrouter") / "configs"))
    return root if kind == "train" else root / kind


def list_presets(kind: str = "train") -> dict[str, str]:
    """Preset name -> one-line description (`kind` train or finetune)."""
    out = {}
    for path in sorted(_preset_dir(kind).glob("*.yaml")):
        raw = load_yaml(path.read_text()) or {}
        lines = str(raw.get("description", "")).strip().splitlines()
        out[path.stem] = lines[0] if lines else ""
    return out


def load_raw(name_or_path: str, seen: tuple[str, ...] = (), kind: str = "train") -> dict[str, Any]:
    """The raw dict of a preset (by name, of `kind`) or YAML file, with its base chain merged."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or os.sep in name_or_path):
        path = _preset_dir(kind) / f"{name_or_path}.yaml"
        if not path.is_file():
            names = list(list_presets(kind))
            raise HyperRouterError(
                f"unknown preset {name_or_path!r}{_suggest(name_or_path, names)}"
            )
    elif not path.is_file():
        cause = "is a folder, not a YAML file" if path.is_dir() else "does not exist"
        raise HyperRouterError(f"config file {name_or_path} {cause}")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise HyperRouterError(f"config file {path} is not valid YAML{where}") from None
    if raw is None:
        raise HyperRouterError(f"config file {path} is empty")
    if not isinstance(raw, dict):
        raise HyperRouterError(f"config file {path} must hold a mapping of keys to values")
    _reject_legacy_top_k(raw, f"config file {path}")
    base = raw.pop("base", None)
    own_name = raw.get("name", path.stem)
    if base is not None:
        if base in seen:
            raise HyperRouterError(f"config {path} has a cyclic base chain: {' -> '.join(seen)}")
        raw = _deep_merge(load_raw(str(base), (*seen, str(base)), kind), raw)
    raw["name"] = own_name
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value) with value parsed as YAML (numbers, lists, null...)."""
    if "=" not in text:
        raise HyperRouterError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise HyperRouterError(f"--set expects key=value, got {text!r}")
    try:
        parsed = load_yaml(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return keys, parsed


def _nested(keys: list[str], value: Any) -> dict[str, Any]:
    for key in reversed(keys):
        value = {key: value}
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set` overrides to a raw config dict (keys are checked when it is built)."""
    raw = copy.deepcopy(raw)
    options_given = set()  # sections whose router_options an override sets
    for text in overrides:
        keys, value = parse_override(text)
        _reject_legacy_top_k(_nested(keys, value), f"--set {text}")
        if "router_options" in keys:
            options_given.add(tuple(keys[: keys.index("router_options")]))
        node = raw
        for i, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise HyperRouterError(f"--set {'.'.join(keys[: i + 1])} is not a section")
            node = child
        old_router = node.get("router", DEFAULT_ROUTER)
        node[keys[-1]] = value
        if keys[-1] == "router" and tuple(keys[:-1]) not in options_given:
            _forget_router_options(node, old_router)
    return raw


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A preset (by name) or YAML file, with `--set` overrides applied, validated."""
    raw = load_raw(name_or_path or "quick")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw)


def resume_config(
    run: dict[str, Any], name_or_path: str | None, overrides: list[str] | None = None
) -> RunConfig:
    """The config a user gives with `--resume`, to be compared with the run's own (`run`, its
    config.json): `--set`/`--data` alone apply to the run's own config; a `--config` preset is
    resolved as for a new run except that the data path stays the run's unless it is given."""
    if name_or_path is None:
        raw = copy.deepcopy(run)
    else:
        raw = load_raw(name_or_path)
        raw.setdefault("data", {})["path"] = (run.get("data") or {}).get("path")
    config = config_from_dict(apply_overrides(raw, overrides or []))
    given, stored = config.data.path, (run.get("data") or {}).get("path")
    if given and stored and os.path.realpath(given) == os.path.realpath(stored):
        config.data.path = stored  # the same file, spelled differently
    return config


def config_diff(
    run: dict[str, Any], given: dict[str, Any], ignore=("description",), labels=("run", "given")
) -> list[str]:
    """`key: value (run) vs value (given)` for every key whose value differs, in config order."""
    out = []
    for key in dict.fromkeys([*run, *given]):
        if key in ignore:
            continue
        a, b = run.get(key, _UNSET), given.get(key, _UNSET)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{line}" for line in config_diff(a, b, (), labels)]
        elif a != b:
            out.append(f"{key}: {_show(a)} ({labels[0]}) vs {_show(b)} ({labels[1]})")
    return out


_UNSET = object()


def _show(value: Any) -> str:
    return "unset" if value is _UNSET else json.dumps(value)


def save_config(config: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
