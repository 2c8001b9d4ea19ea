"""A small registry of named plug-ins, each with a typed, JSON-serializable dataclass config.

Used for allocators and whiteners: ``registry.create("energy", {"...": ...})`` validates the options
against the plug-in's config dataclass and fails with the list of valid names and options.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Generic, Mapping, TypeVar

from .errors import ConfigError

T = TypeVar("T")


@dataclasses.dataclass
class PluginConfig:
    """Base of plug-in configs: plain dataclasses whose fields are JSON values."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> "PluginConfig":
        options = dict(options or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for {cls.__name__}; valid options: {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        values = {name: _coerce(name, value, hints[name]) for name, value in options.items()}
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise :class:`ConfigError` on values out of range (override per plug-in)."""


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Turn CLI strings into the field's type (``"1e-3"`` -> float, ``"true"`` -> bool, choices)."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"option {name!r} must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            if option is type(None):
                if value is None or value == "none":
                    return None
                continue
            try:
                return _coerce(name, value, option)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"option {name!r}: {value!r} fits none of {hint}")
    try:
        if hint is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError(value)
                return lowered in {"true", "1", "yes"}
            return bool(value)
        if hint in (int, float, str):
            return hint(value)
    except (TypeError, ValueError):
        raise ConfigError(f"option {name!r} expects {hint.__name__}, got {value!r}") from None
    return value


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, tuple[type[T], type[PluginConfig]]] = {}

    def register(self, name: str, config: type[PluginConfig]):
        def decorator(cls: type[T]) -> type[T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = (cls, config)
            cls.name = name  # type: ignore[attr-defined]
            cls.config_class = config  # type: ignore[attr-defined]
            return cls

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def config_class(self, name: str) -> type[PluginConfig]:
        return self._lookup(name)[1]

    def create(self, name: str, options: Mapping[str, Any] | PluginConfig | None = None) -> T:
        cls, config_class = self._lookup(name)
        config = options if isinstance(options, config_class) else config_class.from_dict(options)  # type: ignore[arg-type]
        return cls(config)  # type: ignore[call-arg]

    def _lookup(self, name: str) -> tuple[type[T], type[PluginConfig]]:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {self.names()}") from None
