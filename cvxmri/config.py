"""Typed configuration: dataclasses loaded from and saved to YAML.

`from_dict` checks every key and type, so a misspelt key or a wrong type in a YAML file is a
one-line error rather than a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cvxmri.errors import CvxmriError

T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass as plain YAML-friendly data (tuples become lists; mappings stay
    mappings, their values converted)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {key: plain(v) for key, v in value.items()}
        return value

    return plain(config)


def _convert(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except CvxmriError as err:
                errors.append(str(err))
        raise CvxmriError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise CvxmriError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise CvxmriError(f"{where}: expected a mapping, got {value!r}")
        key_type, item = args if args else (Any, Any)
        return {
            _convert(key, key_type, where): _convert(v, item, f"{where}.{key}")
            for key, v in value.items()
        }
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise CvxmriError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise CvxmriError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, where) for v, a in zip(value, args, strict=True))
        item = args[0] if args else Any
        items = [_convert(v, item, where) for v in value]
        return tuple(items) if origin is tuple else items
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CvxmriError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CvxmriError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise CvxmriError(f"{where}: expected {annotation.__name__}, got {value!r}")
        return value
    if origin is typing.Literal:
        if value not in args:
            raise CvxmriError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise CvxmriError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    if unknown:
        raise CvxmriError(f"{where}: unknown key(s) {', '.join(unknown)}")
    values = {key: _convert(value, hints[key], f"{where}.{key}") for key, value in data.items()}
    return cls(**values)


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Load dataclass ``cls`` from a YAML file."""
    path = Path(path)
    if not path.is_file():
        raise CvxmriError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise CvxmriError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return from_dict(cls, data, str(path))


def save_yaml(config: Any, path: str | Path) -> None:
    """Write a dataclass as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
