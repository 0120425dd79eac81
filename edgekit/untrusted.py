"""Reading what a user or a package hands edgekit: YAML and JSON files, typed fields, paths.

Every file edgekit reads from outside (a plan, a preprocess spec, a target, devices.yaml, a
package's manifest.json) goes through here, so the same rules hold everywhere:
- YAML aliases are refused: `*name` lets a few hundred bytes expand to gigabytes (a "billion
  laughs" bomb), and every later copy of the value (dataclasses.asdict, deepcopy, an error message
  that formats it) pays for the expansion again. edgekit never writes aliases itself.
- Files are bounded in size and nesting depth before they are parsed.
- A value is checked against the field's type hint before anything uses it, with one line naming
  the file and the key when it does not fit.
- A path read from a manifest or plan is relative, has no `..`, and resolves inside its package.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from edgekit.errors import BadInput

MAX_FILE_BYTES = 64 << 20  # a plan with every candidate and sensitivity is well under 1 MiB
MAX_DEPTH = 64  # nesting of mappings/lists: edgekit's own files stay under 10


class UnsafeInput(BadInput):
    """Input built to hurt: an alias bomb, a path that leaves its package, a file too large to be ours."""


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases and deep nesting while composing, before anything expands."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise UnsafeInput(f"YAML alias *{event.anchor} at line {event.start_mark.line + 1}: edgekit files "
                              "take no aliases (anchors and * references); write the values out")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise UnsafeInput(f"YAML nested deeper than {MAX_DEPTH} levels at line "
                                  f"{self.peek_event().start_mark.line + 1}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _read_bounded(path: Path, what: str) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise UnsafeInput(f"{what} {path} is {size:,} bytes, over the {MAX_FILE_BYTES >> 20} MiB edgekit reads")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"{what} not found: {path}") from None
    except UnicodeDecodeError:
        raise BadInput(f"{what} {path} is not UTF-8 text") from None
    except IsADirectoryError:
        raise BadInput(f"{what} {path} is a folder, not a file") from None
    except OSError as e:
        raise BadInput(f"cannot read {what} {path}: {e.strerror or e}") from None


def load_yaml_text(text: str, where: str) -> Any:
    """Parse YAML with no aliases and bounded depth; one line naming `where` on any problem."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass: no arbitrary objects
    except UnsafeInput as e:
        raise UnsafeInput(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise BadInput(f"{where}: not valid YAML ({' '.join(str(e).split())[:300]})") from None
    except RecursionError:
        raise UnsafeInput(f"{where}: YAML nested too deeply") from None


def load_yaml(path: str | Path, what: str = "YAML file") -> Any:
    path = Path(path)
    return load_yaml_text(_read_bounded(path, what), str(path))


def load_json(path: str | Path, what: str = "JSON file") -> Any:
    path = Path(path)
    text = _read_bounded(path, what)
    try:
        return json.loads(text)
    except ValueError as e:
        raise BadInput(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise UnsafeInput(f"{path}: JSON nested too deeply") from None


# ---------------------------------------------------------------- typed fields


def check_type(value: Any, hint: Any, where: str, key: str = "") -> Any:
    """`value` if it fits the type hint (str, int, float, bool, None, list[X], dict[K, V], X | None,
    Literal, Any, a dataclass given as a mapping), else BadInput naming `where` (the file) and `key` (the
    path inside it). An int is accepted for a float field (YAML writes 1.0 as 1) and returned as a float;
    a bool is never taken for a number."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def wrong(expected: str) -> BadInput:
        at = f"key '{key}' is" if key else "got"
        return BadInput(f"{where}: {at} {_show(value)}, expected {expected}")

    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return check_type(value, options[0], where, key)
        for option in options:
            try:
                return check_type(value, option, where, key)
            except BadInput:
                continue
        raise wrong(" or ".join(_hint_name(a) for a in args))
    if origin is typing.Literal:
        if value in args:
            return value
        raise wrong(f"one of {', '.join(map(str, args))}")
    if origin is list:
        if not isinstance(value, list):
            raise wrong("a list")
        return [check_type(v, args[0] if args else Any, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong("a mapping")
        key_hint, value_hint = args if args else (Any, Any)
        return {check_type(k, key_hint, where, f"{key} (a key)"): check_type(v, value_hint, where, _join(key, k))
                for k, v in value.items()}
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        return hint(**typed_fields(hint, value, where, key=key))
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong("a number")
    if hint in (int, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise wrong(_hint_name(hint))
    if hint is type(None):
        if value is None:
            return None
        raise wrong("nothing (null)")
    raise TypeError(f"check_type: unsupported hint {hint!r}")  # a programming error, not the user's


def typed_fields(cls: type, raw: Any, where: str, required: tuple[str, ...] | None = None,
                 key: str = "") -> dict[str, Any]:
    """The dataclass's fields from a mapping, each checked against its type hint; unknown keys and missing
    required ones (fields without a default, or `required`) are refused."""
    inside_key = f" in '{key}'" if key else ""
    if not isinstance(raw, dict):
        at = f"key '{key}' is" if key else "got"
        raise BadInput(f"{where}: {at} {_show(raw)}, expected a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in raw if k not in fields)
    if unknown:
        raise BadInput(f"{where}: unknown key '{unknown[0]}'{inside_key} (known: {', '.join(fields)})")
    needed = required if required is not None else tuple(
        n for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    missing = [n for n in needed if n not in raw]
    if missing:
        raise BadInput(f"{where}: missing key '{missing[0]}'{inside_key}")
    return {k: check_type(v, hints[k], where, _join(key, k)) for k, v in raw.items()}


def _join(key: str, name: Any) -> str:
    return f"{key}.{name}" if key else str(name)


def _hint_name(hint: Any) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", float: "a number", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _show(value: Any) -> str:
    """A short rendering of a value for an error line (never the whole of a large one)."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"


# ---------------------------------------------------------------- paths inside a package

_DRIVE = re.compile(r"^[A-Za-z]:")


def relative_path_problem(rel: Any) -> str | None:
    """Why `rel` is not a plain relative POSIX path inside a folder (None: it is one)."""
    if not isinstance(rel, str) or not rel:
        return "is not a non-empty string"
    if rel.startswith("/") or _DRIVE.match(rel):
        return "is an absolute path"
    if "\\" in rel:
        return "has a backslash"
    if "\x00" in rel:
        return "has a NUL byte"
    if any(part in ("..", ".", "") for part in rel.split("/")):
        return "has a '..', '.' or empty path component"
    return None


def inside(root: str | Path, rel: str, what: str) -> Path:
    """root/rel, refused unless `rel` is a plain relative path that resolves (links followed) inside root."""
    problem = relative_path_problem(rel)
    if problem:
        raise UnsafeInput(f"{what} {rel!r}: {problem}; a package refers only to files inside itself")
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        raise UnsafeInput(f"{what} {rel!r} resolves to {path}, outside the package {base}")
    return path
