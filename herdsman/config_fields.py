"""The fields of Herdsman's configuration sections and their checks: a field declares its range, its allowed values
or how it is secret (`_f`), and `_validate` checks a section against those declarations, each error one line
naming the key. herdsman/config.py declares the sections with them."""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import field
from typing import Any

from herdsman import HerdsmanError
from herdsman.secrets import redact_url


class ConfigError(HerdsmanError):
    pass


_INT64 = (-(2**63), 2**63 - 1)

MAX_DURATION_S = 1e7
"""The longest duration (a `*_s` field) any section accepts: about 115 days. Durations end up in Event.wait and
time.sleep, which raise OverflowError beyond threading.TIMEOUT_MAX (about 292 years); nothing Herdsman waits for or
models needs more than a few weeks."""


def _f(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
       lt: float | None = None, choices: tuple[str, ...] | None = None, secret: str | None = None) -> Any:
    """A field with its valid range (ge/gt/le/lt), its allowed values (choices) or how it is secret ("token": never
    shown; "url": shown with the password hidden)."""
    rules = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "secret": secret}
    return field(default=default, metadata={k: v for k, v in rules.items() if v is not None})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _show(value: Any, secret: str | None = None) -> str:
    """A value as it appears in a one-line error: repr, shortened; secrets hidden."""
    if secret == "token":
        return "<hidden>"
    if secret == "url" and isinstance(value, str):
        value = redact_url(value)
        if "@" in value and "://" not in value:  # not a URL: its user:password@ part cannot be told apart
            return "<hidden>"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<{value.bit_length()}-bit integer>"
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + "..." + text[-15:]


def _type_error(name: str, typ: type, value: Any, secret: str | None = None) -> ConfigError:
    return ConfigError(f"config key '{name}' must be {typ.__name__}, got {type(value).__name__} "
                       f"{_show(value, secret)}")


def _validate(obj: Any, section: str) -> None:
    """Types and declared ranges of every field of one section (see the module docstring)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        typ, value, meta = hints[f.name], getattr(obj, f.name), f.metadata
        if dataclasses.is_dataclass(typ):
            continue  # validated when it was built
        key = f"{section}.{f.name}" if section else f.name
        secret = meta.get("secret")
        if typ is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _type_error(key, typ, value, secret)
            if not math.isfinite(value):
                raise ConfigError(f"{key} = {_show(value, secret)} must be a finite number")
        elif typ is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise _type_error(key, typ, value, secret)
            if not _INT64[0] <= value <= _INT64[1]:
                raise ConfigError(f"{key} = {_show(value, secret)} does not fit in 64 bits")
        elif not isinstance(value, typ):
            raise _type_error(key, typ, value, secret)
        if typ is str:
            if "\0" in value:
                raise ConfigError(f"{key} must not contain a NUL character")
            choices = meta.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(f"{key} = {_show(value, secret)} must be one of {', '.join(map(repr, choices))}")
        if typ in (int, float):
            bounds = {op: meta[op] for op in ("ge", "gt", "le", "lt") if op in meta}
            if not bounds and f.name.endswith("_s"):
                bounds = {"ge": 0}
            if not _within(value, bounds):
                raise ConfigError(f"{key} = {_show(value, secret)} must be {_describe(bounds)}")
            if f.name.endswith("_s") and value > MAX_DURATION_S:  # a duration: a sane upper bound as well
                raise ConfigError(f"{key} = {_show(value, secret)} must be <= {MAX_DURATION_S:g} s (about 115 days)")


def _within(v: float, bounds: dict[str, float]) -> bool:
    return all({"ge": v >= b, "gt": v > b, "le": v <= b, "lt": v < b}[op] for op, b in bounds.items())


def _describe(bounds: dict[str, float]) -> str:
    lo = [(op, b) for op, b in bounds.items() if op in ("ge", "gt")]
    hi = [(op, b) for op, b in bounds.items() if op in ("le", "lt")]
    if lo and hi:
        (lop, lb), (hop, hb) = lo[0], hi[0]
        return f"in {'[' if lop == 'ge' else '('}{lb}, {hb}{']' if hop == 'le' else ')'}"
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{words[op]} {b}" for op, b in bounds.items())
