"""Write a TOML document from plain values: the one writer of generated cluster configs.

The harness, the end-to-end tests and the benchmarks build their config as data and write
it here, rather than each assembling TOML text with f-strings (where quoting a path or a
command is easy to get wrong). Only what configs use: tables of scalars, arrays of tables,
inline tables and arrays as values. Not a general TOML library (fsha only reads TOML,
with ``tomllib``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def value(v: Any) -> str:
    """One TOML value: string, bool, int, float, array, or inline table."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"no TOML for {v!r}")
        return repr(v)
    if isinstance(v, str):
        return string(v)
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + " }" \
            if v else "{}"
    if isinstance(v, Sequence):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {type(v).__name__}")


def string(s: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped."""
    out = []
    for c in s:
        if c == '"' or c == "\\":
            out.append("\\" + c)
        elif c < " " or c == "\x7f":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def key(k: str) -> str:
    """A bare key when it can be one, else a quoted key."""
    if k and all(c.isascii() and (c.isalnum() or c in "-_") for c in k):
        return k
    return string(k)


def dumps(doc: Mapping[str, Any], header: str = "") -> str:
    """``doc``'s top-level keys in order: a mapping is a ``[table]``, a list of mappings an
    ``[[array of tables]]``, anything else a top-level ``key = value`` (written first, as
    TOML requires). ``header``: a comment line at the top."""
    lines = [f"# {header}"] if header else []
    tables: list[tuple[str, Any]] = []
    for k, v in doc.items():
        if _is_table(v) or _is_table_array(v):
            tables.append((k, v))
        else:
            lines.append(f"{key(k)} = {value(v)}")
    for k, v in tables:
        for table in ([v] if _is_table(v) else v):
            if lines and lines[-1] != "":
                lines.append("")
            lines.append(f"[{key(k)}]" if _is_table(v) else f"[[{key(k)}]]")
            lines += [f"{key(name)} = {value(x)}" for name, x in table.items()]
    return "\n".join(lines) + "\n"


def _is_table(v: Any) -> bool:
    return isinstance(v, Mapping)


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, Mapping) for x in v)
