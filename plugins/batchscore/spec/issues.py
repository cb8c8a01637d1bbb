"""Validation errors as :class:`SpecIssue`s that name the YAML's line and key, in words, with "did you mean"."""

from __future__ import annotations

import difflib
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BaseModel, ValidationError

from batchscore.errors import SpecIssue
from batchscore.spec.base import short

#: Keys of Azure's deployment YAML that batchscore spells otherwise, and how (top level only).
_LEGACY = (
    "Azure's legacy layout (no type:) keeps settings at the top level; batchscore reads them under settings: "
    "(as Azure does with type: model), so move it there"
)
KEY_HINTS: dict[str, str] = {
    key: _LEGACY
    for key in (
        "mini_batch_size",
        "max_concurrency_per_instance",
        "output_action",
        "output_file_name",
        "retry_settings",
        "error_threshold",
        "logging_level",
        "environment_variables",
    )
}


def booleans_for_numbers(model: type[BaseModel], data: Any, lines: dict[tuple, int]) -> list[SpecIssue]:
    """true/false (YAML also reads yes, no, on, off so) where a number belongs; pydantic takes them for 1 and 0."""
    issues: list[SpecIssue] = []

    def walk(tp: Any, value: Any, path: tuple) -> None:
        tp = _unwrap(tp)
        if isinstance(value, bool):
            if tp in (int, float):
                what = "a whole number" if tp is int else "a number"
                issues.append(
                    SpecIssue(
                        lines.get(path),
                        dotted(path),
                        f"must be {what}, got the boolean {json.dumps(value)} "
                        "(YAML reads true, false, yes, no, on and off as booleans)",
                    )
                )
            return
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, child in items:
            child_type = _child_type(tp, key)
            if child_type is not None:
                walk(child_type, child, path + (key,))

    walk(model, data, ())
    return issues


def dotted(path: tuple) -> str:
    """A key path as the messages write it: ``deployments[1].output.path``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _data_path(loc: tuple, data: Any, error_type: str) -> tuple:
    """Keep the parts of a pydantic ``loc`` that are keys of the YAML (drop union-member tags)."""
    path: tuple = ()
    current = data
    for i, part in enumerate(loc):
        if isinstance(current, dict) and part in current:
            current = current[part]
            path += (part,)
        elif isinstance(current, list) and isinstance(part, int) and part < len(current):
            current = current[part]
            path += (part,)
        elif i == len(loc) - 1 and error_type in ("missing", "extra_forbidden"):
            path += (part,)
        # else: a tag pydantic adds for union members or validators; not a YAML key
    return path


def _allowed_keys(model: type[BaseModel], parent: tuple) -> list[str]:
    """The keys allowed at ``parent`` in ``model``'s schema (field names and aliases)."""
    tp: Any = model
    for part in parent:
        tp = _child_type(tp, part)
        if tp is None:
            return []
    tp = _unwrap(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):  # a value of several shapes, e.g. schedule
        models = [_unwrap(a) for a in typing.get_args(tp)]
        tp = next((m for m in models if isinstance(m, type) and issubclass(m, BaseModel)), tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return sorted(f.alias or name for name, f in tp.model_fields.items())
    return []


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _child_type(tp: Any, part: Any) -> Any:
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            found = _child_type(arg, part)
            if found is not None:
                return found
        return None
    if isinstance(part, int):
        return typing.get_args(tp)[0] if origin in (list, tuple) else None
    if origin is dict:
        return typing.get_args(tp)[1]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        for name, f in tp.model_fields.items():
            if part in (name, f.alias):
                return f.annotation
    return None


def validation_issues(
    exc: ValidationError, data: dict, lines: dict[tuple, int], model: type[BaseModel], base_dir: Path | None = None
) -> list[SpecIssue]:
    """The issues of a failed validation of ``data``, one per key, by line: unknown, missing or wrong keys, in words."""
    issues: list[SpecIssue] = []
    seen: set[tuple] = set()
    for err in exc.errors():
        path = _data_path(err["loc"], data, err["type"])
        if path in seen:  # several union members failed for one value: report it once
            continue
        seen.add(path)
        if err["type"] == "value_error":  # a check of a whole mapping or list: point at the key it is about
            path = _culprit(path, data, lines, err["msg"].removeprefix("Value error, "), base_dir)
        line = next((lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in lines), None)
        if err["type"] == "extra_forbidden":
            message = f"unknown key {path[-1]!r}"
            top = len(path) == 1 or (len(path) == 3 and path[0] == "deployments")  # a deployment's own key
            hint = KEY_HINTS.get(str(path[-1])) if top else None
            match = difflib.get_close_matches(str(path[-1]), _allowed_keys(model, path[:-1]), n=1, cutoff=0.8)
            if hint:
                message += f"; {hint}"
            elif match:
                message += f"; did you mean {match[0]!r}?"
            else:
                allowed = _allowed_keys(model, path[:-1])
                if allowed:
                    message += f"; allowed keys here: {', '.join(allowed)}"
        elif err["type"] == "missing":
            message = "required key is missing"
        elif err["type"] == "string_pattern_mismatch":
            message = (
                "must start with a letter or digit and hold only letters, digits, '_' and '-' "
                f"(at most 63 characters), got {short(err.get('input'))}"
            )
        elif err["type"] == "value_error":  # our validators' messages already quote the value
            message = err["msg"].removeprefix("Value error, ")
        elif err["type"] in ("model_type", "dict_type"):  # pydantic: "a valid dictionary or instance of ModelSpec"
            message = f"must be a mapping of keys, got {short(err.get('input'))}"
        elif err["type"] == "list_type":
            message = f"must be a list, got {short(err.get('input'))}"
        else:
            message = f"{err['msg']} (got {short(err.get('input'))})"
        issues.append(SpecIssue(line, dotted(path) or None, message))
    return sorted(issues, key=lambda i: i.line or 0)


def _culprit(path: tuple, data: Any, lines: dict[tuple, int], message: str, base_dir: Path | None) -> tuple:
    """The key a whole-mapping or whole-list check is about, when it can be told; else ``path``.

    A mapping's check that names a key first ("settings.max_concurrency_per_instance is 4 but
    ...") points at that key; a list of deployments that repeats a name or an output folder
    points at the repeat.
    """
    value = _value_at(data, path)
    if isinstance(value, dict):
        named = path + tuple(message.split(" ", 1)[0].split("."))
        return named if named in lines else path
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        for key in (("name",), ("output", "path")):
            seen: set[Any] = set()
            for i, item in enumerate(value):
                found = _value_at(item, key)
                if isinstance(found, str) and key[0] == "output" and base_dir is not None:
                    found = (base_dir / found).resolve()
                if found is not None and found in seen and path + (i, *key) in lines:
                    return path + (i, *key)
                seen.add(found)
    return path


def _value_at(data: Any, path: tuple) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data
