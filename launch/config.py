"""The run config: typed component configs composed, validated in one place.

A recipe is a TOML file with one table per component (``[data]``, ``[model]``, ``[loss]``,
``[optim]``, ``[loop]``) and arrays of tables for evaluations (``[[zeroshot]]``,
``[[retrieval]]``, ``[[linear_probe]]``). The command line adds ``section.key=value`` overrides, whose values are
read as TOML literals (``loop.steps=200``, ``optim.betas=[0.9,0.95]``) or, failing that, as
plain strings (``data.shards=/data/cc3m``); entries of an array of tables go by index
(``zeroshot.0.root=/data/imagenet``). Unknown keys and ill-typed values are rejected
with the valid choices before anything runs.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from clipline.data.hints import did_you_mean
from clipline.data.stream import StreamConfig
from clipline.eval.evaluators import (
    LinearProbeTask,
    RetrievalTask,
    Task,
    ZeroShotTask,
    list_evaluators,
)
from clipline.pretrain.loop import LoopConfig
from clipline.pretrain.loss import LossConfig
from clipline.pretrain.model import ModelConfig
from clipline.pretrain.optim import OptimConfig


@dataclass(kw_only=True)
class RunConfig:
    """Everything one training run needs; only ``clipline.launch`` sees all of it."""

    run_dir: str = "runs/run"
    data: StreamConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    zeroshot: list[ZeroShotTask] = field(default_factory=list)
    retrieval: list[RetrievalTask] = field(default_factory=list)
    linear_probe: list[LinearProbeTask] = field(default_factory=list)

    def validate(self) -> None:
        """Rules across components; each component config checked its own fields when built.

        Raises:
            ValueError: naming the offending values and the fix.
        """
        if self.loop.steps is not None and self.optim.warmup_steps >= self.loop.steps:
            raise ValueError(
                f"optim.warmup_steps={self.optim.warmup_steps} leaves no decay within "
                f"loop.steps={self.loop.steps}; lower optim.warmup_steps"
            )
        names = [t.name for t in self.tasks()]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation names must be unique, got {names}")
        if self.loop.max_reference_drop > 0 and not any(t.reference for t in self.zeroshot):
            raise ValueError(
                f"loop.max_reference_drop={self.loop.max_reference_drop} watches reference tasks, "
                "but no [[zeroshot]] task has reference = true; mark the task(s) the model must "
                "not forget (e.g. zeroshot.0.reference=true), or set loop.max_reference_drop=0"
            )
        # Unknown model and tower names fail here, before any data is read. Not in
        # ModelConfig.__post_init__: resolving runs the towers' builders (a plugin's too),
        # which should run once per model built, and DualEncoder.from_config resolves anyway.
        self.model.resolve()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def tasks(self) -> list[Task]:
        """Every evaluation task, kind by kind in :func:`list_evaluators` order."""
        return [task for kind in list_evaluators() for task in getattr(self, kind)]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _reject_nonfinite(value: Any, key: str) -> None:
    """TOML reads ``nan`` and ``inf`` as floats; no setting means them (``optim.lr=nan``
    would otherwise fail inside AdamW, or train on NaN, without naming the key)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key}={value}: must be a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            _reject_nonfinite(v, f"{key}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _reject_nonfinite(v, f"{key}[{i}]")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp``; returns it in the field's type."""
    _reject_nonfinite(value, key)
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ValueError:
                continue
        raise _type_error(key, value, tp)
    if origin is Literal:
        if value not in args:
            hint = did_you_mean(str(value), [str(a) for a in args])
            raise ValueError(f"{key}: {value!r} is not one of {list(args)}.{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _type_error(key, value, tp)
        return build(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _type_error(key, value, tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _type_error(key, value, tp)
            return tuple(
                _coerce(v, a, f"{key}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(key, value, tp)
        return dict(value)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise _type_error(key, value, tp)


def _type_error(key: str, value: Any, tp: Any) -> ValueError:
    return ValueError(
        f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}); "
        f"fix the recipe or pass e.g. {key}=<{_type_name(tp)}>"
    )


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from a dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        hints = "".join(did_you_mean(prefix + k, [prefix + f for f in fields]) for k in unknown)
        raise ValueError(
            f"unknown config key(s) {[prefix + k for k in unknown]}.{hints} Valid keys here: "
            f"{[prefix + k for k in fields]}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    missing = [
        prefix + f.name
        for f in fields.values()
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"missing required config key(s) {missing}")
    return cls(**kwargs)


def recipe_names() -> list[str]:
    root = resources.files("clipline.launch") / "recipes"
    return sorted(p.name.removesuffix(".toml") for p in root.iterdir() if p.name.endswith(".toml"))


def read_recipe(recipe: str) -> dict[str, Any]:
    """A recipe by file path, or by the name of one shipped in ``launch/recipes/``."""
    path = Path(recipe)
    if not path.is_file():
        shipped = resources.files("clipline.launch") / "recipes" / f"{recipe}.toml"
        if not shipped.is_file():
            raise ValueError(
                f"recipe {recipe!r} is neither a file nor a shipped recipe."
                f"{did_you_mean(recipe, recipe_names())} Shipped: {recipe_names()}"
            )
        return tomllib.loads(shipped.read_text())
    return tomllib.loads(path.read_text())


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # bare strings: paths, names


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies ``a.b.c=value`` overrides to a nested dict (a copy)."""
    out = _deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. loop.steps=100)")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            if isinstance(node, list):  # an array of tables, by index: zeroshot.0.root=...
                if not part.isdigit() or int(part) >= len(node):
                    raise ValueError(
                        f"override {item!r}: {part!r} is not an index of the {len(node)} "
                        "entries there (0-based)"
                    )
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                raise ValueError(f"override {item!r}: {part!r} is not a config section")
        if isinstance(node, list):
            where = ".".join(parents)
            raise ValueError(f"override {item!r}: name an entry, e.g. {where}.0.{leaf}=...")
        node[leaf] = _parse_value(text)
    return out


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def load_run_config(recipe: str | dict[str, Any], overrides: list[str] = ()) -> RunConfig:
    """Recipe (path, shipped name or dict) + overrides -> a validated RunConfig."""
    data = read_recipe(recipe) if isinstance(recipe, str) else recipe
    cfg = build(RunConfig, apply_overrides(data, list(overrides)))
    cfg.validate()
    return cfg
