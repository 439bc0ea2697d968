"""EngineArgs: every engine keyword by its vLLM name, flat, as `LLM(model=..., **kwargs)` and the
command line take them.

Nothing here repeats a config field: EngineArgs is built from the init fields of the config
dataclasses (their names, types, defaults and help), and `create_engine_config` hands each value
back to the config it came from. A new config field is therefore a new keyword and a new flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from folovllm.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig

# EngineConfig field -> the config class whose fields become keywords. EngineConfig's other
# init fields (device, attention_backend, enforce_eager) are keywords themselves.
_SUB_CONFIGS = {"model_config": ModelConfig, "cache_config": CacheConfig,
                "scheduler_config": SchedulerConfig, "parallel_config": ParallelConfig}
# Keywords that are not command-line flags (a dict has no natural flag form).
_NOT_FLAGS = {"hf_overrides"}


def _engine_fields() -> list[tuple[str | None, dataclasses.Field, Any]]:
    """(owning EngineConfig field or None for EngineConfig itself, field, resolved type)."""
    out = []
    for owner, cls in [*_SUB_CONFIGS.items(), (None, EngineConfig)]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init and f.name not in _SUB_CONFIGS:
                out.append((owner, f, hints[f.name]))
    return out


_FIELDS = _engine_fields()
_OWNER = {f.name: owner for owner, f, _ in _FIELDS}


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory)
    return dataclasses.MISSING


def _make_engine_args() -> type:
    specs = []
    for _, f, hint in _FIELDS:
        default = _default_of(f)
        if default is dataclasses.MISSING:
            specs.append((f.name, hint, dataclasses.field(metadata=f.metadata)))
        elif isinstance(default, dataclasses.Field):
            specs.append((f.name, hint, default))
        else:
            specs.append((f.name, hint, dataclasses.field(default=default, metadata=f.metadata)))
    return dataclasses.make_dataclass("EngineArgs", specs, namespace={
        "__doc__": __doc__,
        "__module__": __name__,
        "from_kwargs": classmethod(_from_kwargs),
        "create_engine_config": _create_engine_config,
    })


def _from_kwargs(cls, **kwargs: Any):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"unknown engine argument(s) {unknown}; known ones are {sorted(names)}")
    return cls(**kwargs)


def _create_engine_config(self) -> EngineConfig:
    """Split the keywords over the configs; each config validates and resolves its own."""
    per_owner: dict[str | None, dict[str, Any]] = {owner: {} for owner in [*_SUB_CONFIGS, None]}
    for f in dataclasses.fields(self):
        per_owner[_OWNER[f.name]][f.name] = getattr(self, f.name)
    subs = {owner: cls(**per_owner[owner]) for owner, cls in _SUB_CONFIGS.items()}
    return EngineConfig(**subs, **per_owner[None])


EngineArgs = _make_engine_args()


def add_cli_args(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    """One flag per EngineArgs field, named as vLLM's (--max-model-len, --block-size, ...)."""
    group = parser.add_argument_group("engine")
    for _, f, hint in _FIELDS:
        if f.name in _NOT_FLAGS:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help")
        if f.name == "model":
            from folovllm.assets import DEFAULT_MODEL
            group.add_argument(flag, default=default_model or DEFAULT_MODEL,
                               help=f"{help_text} (default: %(default)s)")
            continue
        base = hint
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None -> X
            base = next(t for t in typing.get_args(hint) if t is not type(None))
        if typing.get_origin(base) is typing.Literal:
            group.add_argument(flag, choices=typing.get_args(base), default=f.default, help=help_text)
        elif base is bool:  # bool, or bool | None where None means "the engine decides"
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            group.add_argument(flag, type=base if base in (int, float) else str, default=f.default,
                               help=help_text)


def from_cli_args(ns: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    return EngineArgs(**{k: v for k, v in vars(ns).items() if k in names})
