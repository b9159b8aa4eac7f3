"""Strict YAML <-> dataclass configuration, shared by every training stage.

Each component keeps its own `@dataclass` config next to its code (STYLE rule 8); a stage config is a dataclass whose
fields are those sections, e.g. `model: LlamaConfig`, `data: TextDataConfig`, `train: TrainConfig`. YAML files in
`configs/` are only the serialized form. Loading is strict: an unknown key, a missing required field or a value of
the wrong type raises `ConfigError` naming the dotted key, the source and what is accepted.

A section whose dataclass has a `preset(name, **overrides)` classmethod may be given as a preset name
(`model: debug`) or as a mapping with a `preset` key (`model: {preset: debug, dim: 128}`).

Command-line overrides look like `--train.lr=3e-4` or `--train.steps 50` and are merged over the file.
"""

from __future__ import annotations

import copy
import inspect
import math
import types
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from mm_llama.errors import ConfigError

T = TypeVar("T")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML would silently keep the last one, e.g. of two `train:`)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may legitimately repeat keys it merges
            continue
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, Hashable):  # an unhashable key is reported by construct_mapping itself
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Dumper(yaml.SafeDumper):
    """Block-style sections, but lists of scalars on one line (`shards: [a.tar, b.tar]`) for readability."""


def _represent_list(dumper: _Dumper, data: list) -> yaml.Node:
    flow = all(not isinstance(item, list | dict) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _has_preset(cls: type) -> bool:
    return isinstance(inspect.getattr_static(cls, "preset", None), classmethod)


def _type_name(tp: Any) -> str:
    """A readable name of an annotation for error messages: `int`, `float | None`, `list[str]`, `one of 'a', 'b'`."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is type(None):
        return "None"
    if origin in (Union, types.UnionType):
        return " | ".join(f"Literal{list(get_args(a))}" if get_origin(a) is Literal else _type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if is_dataclass(tp):
        return f"a {tp.__name__} mapping" + (" or preset name" if _has_preset(tp) else "")
    if origin is not None:
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    return getattr(tp, "__name__", repr(tp))


def _bad(tp: Any, value: Any, path: str, source: str) -> ConfigError:
    return ConfigError(f"{source}: '{path}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _convert(tp: Any, value: Any, path: str, source: str) -> Any:
    """Check `value` against the annotation `tp` and return it converted (int -> float, list -> tuple, ...)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        if len(arms) != 1:  # only `X | None`: with `int | str`, which arm a YAML `12` means would be a guess
            raise TypeError(f"mm_llama.config supports only `X | None` unions, not {tp!r} (field '{path}')")
        return None if value is None else _convert(arms[0], value, path, source)
    if origin is Literal:
        # Compare types too: `True == 1`, so a plain `in` would accept True for Literal[1].
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _bad(tp, value, path, source)
    if is_dataclass(tp):
        return value if isinstance(value, tp) else _build(tp, value, path, source)
    if tp is bool:
        if isinstance(value, bool):  # never 1/0 or "true": a typo should not silently flip a switch
            return value
    elif tp is int or tp is float:
        # PyYAML follows YAML 1.1 and reads `3e-4` (no dot) as a string, so numeric strings are accepted here.
        number = None
        if isinstance(value, str):
            try:
                number = tp(value.strip())
            except ValueError:
                raise _bad(tp, value, path, source) from None
        elif (isinstance(value, int) and not isinstance(value, bool)) or (tp is float and isinstance(value, float)):
            number = tp(value)
        if number is not None:
            if not math.isfinite(number):  # no field means anything by nan or inf; torch would fail much later
                raise ConfigError(f"{source}: '{path}' must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list or (origin is tuple and args[1:] == (Ellipsis,)):
        if not isinstance(value, list | tuple):
            raise _bad(tp, value, path, source)
        items = [_convert(args[0], v, f"{path}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    elif origin is dict:
        if not isinstance(value, Mapping):
            raise _bad(tp, value, path, source)
        return {_convert(args[0], k, f"{path} key {k!r}", source): _convert(args[1], v, _join(path, k), source)
                for k, v in value.items()}
    else:
        raise TypeError(f"mm_llama.config does not support the annotation {tp!r} (field '{path}')")
    raise _bad(tp, value, path, source)


def _convert_fields(cls: type, data: Mapping, path: str, source: str, *, partial: bool) -> dict:
    """Check a mapping's keys and values against `cls`'s fields; `partial` for preset overrides."""
    hints = get_type_hints(cls)  # resolves string annotations (`from __future__ import annotations`)
    init_fields = {f.name: f for f in fields(cls) if f.init}
    known = list(init_fields) + (["preset"] if _has_preset(cls) else [])
    for key in data:
        if key not in init_fields:
            where = f"section '{path}'" if path else "the top level"
            raise ConfigError(f"{source}: unknown key '{_join(path, key)}'; known keys of {where}: {known}")
    missing = [_join(path, name) for name, f in init_fields.items()
               if name not in data and f.default is MISSING and f.default_factory is MISSING]
    if missing and not partial:
        raise ConfigError(f"{source}: missing required key(s) {', '.join(map(repr, missing))} "
                          f"({cls.__name__} has no default for them)")
    return {key: _convert(hints[key], value, _join(path, key), source) for key, value in data.items()}


def _located(make: Callable[[], Any], path: str, source: str) -> Any:
    """Call a component's constructor or `preset`; its own validation does not know the file or key, so add them."""
    try:
        return make()
    except ConfigError as e:
        raise ConfigError(f"{source}: {repr(path) if path else 'top level'}: {e}") from e


def _build(cls: type, data: Any, path: str, source: str) -> Any:
    if isinstance(data, str) and _has_preset(cls):
        return _located(lambda: cls.preset(data), path, source)
    if not isinstance(data, Mapping):
        if path:
            raise _bad(cls, data, path, source)
        raise ConfigError(f"{source}: expected a mapping of {cls.__name__} keys, got {data!r} ({type(data).__name__})")
    if "preset" in data and _has_preset(cls):
        name = data["preset"]
        if not isinstance(name, str):
            raise _bad(str, name, _join(path, "preset"), source)
        overrides = _convert_fields(cls, {k: v for k, v in data.items() if k != "preset"}, path, source, partial=True)
        return _located(lambda: cls.preset(name, **overrides), path, source)
    kwargs = _convert_fields(cls, data, path, source, partial=False)
    return _located(lambda: cls(**kwargs), path, source)


def from_dict(cls: type[T], data: Mapping, *, source: str = "config") -> T:
    """Build the (nested) dataclass `cls` from plain data, strictly.

    Args:
        cls: a dataclass type; fields that are dataclasses are built recursively (or from a preset).
        data: field names to values, as read from YAML.
        source: where `data` came from (a file name), repeated in every error message.
    Returns:
        An instance of `cls`, after its own `__post_init__` ran. Raises ConfigError on an unknown or missing key,
        a value of the wrong type, or a failed validation.
    """
    if not (isinstance(cls, type) and is_dataclass(cls)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    return _build(cls, data, "", source)


def _plain(value: Any, path: str) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), _join(path, f.name)) for f in fields(value) if f.init}
    if isinstance(value, Mapping):
        return {k: _plain(v, _join(path, k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if value is None or type(value) in (bool, int, float, str):
        return value
    raise TypeError(f"'{path}' = {value!r} ({type(value).__name__}) cannot be written to YAML")


def to_dict(cfg: Any) -> dict:
    """Args: cfg, a dataclass instance. Returns: its fields as plain YAML-safe values (tuples as lists), in order."""
    if not is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {cfg!r}")
    return _plain(cfg, "")


def to_yaml(cfg: Any) -> str:
    """Args: cfg, a dataclass instance. Returns: the resolved config as YAML, keys in field order."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True,
                     width=120)


def parse_overrides(args: Sequence[str]) -> dict:
    """Turn `--a.b=value` / `--a.b value` arguments into a nested dict.

    Args:
        args: command-line arguments; each value is parsed with YAML (`true`, `12`, `[1, 2]`, `null`).
    Returns:
        A nested dict, e.g. `{"train": {"lr": "3e-4"}}` (numeric strings become numbers in `from_dict`).
    """
    args, result, i = list(args), {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: expected --section.key=value or --section.key value, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = arg[2:], args[i + 1]
            i += 2
        else:
            key, raw = arg[2:], ""
        if raw == "":
            raise ConfigError(f"command line: {arg!r} has no value; write --{key}=VALUE or --{key} VALUE")
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"command line: {arg!r} has a malformed key; expected --section.key=value")
        try:
            value = yaml.load(raw, Loader=_StrictLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"command line: cannot parse the value of {arg!r} as YAML: {e}") from e
        for part in reversed(parts):
            value = {part: value}
        result = merge(result, value)
    return result


def merge(base: Mapping, overrides: Mapping) -> dict:
    """Deep-merge `overrides` over `base` (overrides win); neither input is modified.

    Args:
        base: nested dict, e.g. read from YAML.
        overrides: nested dict, e.g. from `parse_overrides`.
    Returns:
        A new dict. A preset name overridden by a mapping becomes `{"preset": name, **mapping}`, so `model: debug`
        plus `--model.dim=128` means the debug preset with dim 128.
    """
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        old = out.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping | str):
            out[key] = merge({"preset": old} if isinstance(old, str) else old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from e
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark, context = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        started = f" ({e.context} at line {context.line + 1})" if context and getattr(e, "context", None) else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}{started}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Read a YAML config, apply command-line overrides and build `cls` strictly.

    Args:
        cls: the stage config dataclass.
        path: YAML file, or None to start from `cls`'s defaults.
        overrides: arguments such as `["--train.lr=3e-4", "--model.preset", "debug"]`.
    Returns:
        An instance of `cls`. Errors name the file (and "command line" when overrides were given).
    """
    data = {} if path is None else _read_yaml(Path(path))
    if overrides:
        data = merge(data, parse_overrides(overrides))
    source = " + ".join(([str(path)] if path is not None else []) + (["command line"] if overrides else []))
    return from_dict(cls, data, source=source or "defaults")


def save_config(cfg: Any, path: str | Path) -> None:
    """Args: cfg, a config dataclass; path, the YAML file to write (parent directories are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg), encoding="utf-8")
