"""SageMaker's DataProcessing for CSV and JSON records: a JSONPath subset, filters and the join.

The JSONPath subset is the one SageMaker documents for ``InputFilter`` and ``OutputFilter``::

    $            the whole record
    $.name       $['name']      $['a','b']      a key, or several
    $[0]  $[-1]  $[1,3]         an index (negative counts from the end), or several
    $[1:] $[:-1] $[1:3]         a slice (Python's rules)
    $.*   $[*]                  everything
    $.features[0:2]             steps combine along a path

A single key or index selects that value. Several keys give an object with those keys;
several indexes, a slice or ``*`` on an array give an array (``*`` on an object keeps the
object). After a step that selects several values, the rest of the path applies to each of
them (``$[*].id``: the ``id`` of every element). A key or index that is not there fails the
record; a slice never does.

A CSV record is the row as a JSON array of strings, so ``$[1:]`` drops the first column.
:func:`parse` is also what the orchestrator calls to validate a deployment's filters, so it
stays cheap and imports nothing but the standard library.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Union

from batchscore_runtime.records import FileError

CSV = "csv"
JSON = "json"
CSV_CONTENT_TYPES = ("text/csv",)
JSON_CONTENT_TYPES = ("application/jsonlines", "application/x-jsonlines", "application/json")
JOIN_KEY = "SageMakerOutput"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_INT = re.compile(r"-?[0-9]+")

Index = Union[int, slice]


class FilterMiss(LookupError):
    """A path step found nothing in a value: the reason, without the record."""


@dataclass(frozen=True)
class _Step:
    kind: str  # "key" | "index" | "all"
    items: tuple  # keys (str), or indexes (int) and slices
    text: str  # the step as written, for messages

    @property
    def several(self) -> bool:
        return self.kind == "all" or len(self.items) > 1 or any(isinstance(i, slice) for i in self.items)


@dataclass(frozen=True)
class JSONPath:
    """A parsed JSONPath of the supported subset; :meth:`apply` evaluates it on a JSON value."""

    expr: str
    steps: tuple[_Step, ...]

    @property
    def identity(self) -> bool:
        return not self.steps

    def apply(self, value: Any) -> Any:
        """The selected value; raises :class:`FilterMiss` when a key or index is not there."""
        return _apply(self.steps, value)


@functools.lru_cache(maxsize=64)
def parse(expr: str) -> JSONPath:
    """Parse ``expr``; raises ``ValueError`` naming what is not supported, and where."""
    if not isinstance(expr, str):
        raise ValueError(f"a JSONPath must be a string, got {type(expr).__name__}")
    text = expr.strip()
    if not text.startswith("$"):
        raise ValueError(f"JSONPath {expr!r} must start with '$' (the record)")
    steps: list[_Step] = []
    pos = 1
    while pos < len(text):
        start = pos
        if text.startswith("..", pos):
            raise _unsupported(expr, pos, "recursive descent ('..') is not supported")
        if text[pos] == ".":
            pos += 1
            if text.startswith("*", pos):
                steps.append(_Step("all", (), ".*"))
                pos += 1
                continue
            match = _NAME.match(text, pos)
            if not match:
                raise _unsupported(expr, pos, "'.' must be followed by a key name or '*' (use ['key'] for other keys)")
            steps.append(_Step("key", (match.group(),), text[start : match.end()]))
            pos = match.end()
        elif text[pos] == "[":
            step, pos = _parse_brackets(expr, text, pos)
            steps.append(step)
        else:
            raise _unsupported(expr, pos, f"unexpected {text[pos]!r}; a step is .key, .*, or [...]")
    return JSONPath(expr, tuple(steps))


def _unsupported(expr: str, pos: int, reason: str) -> ValueError:
    return ValueError(f"JSONPath {expr!r}, character {pos + 1}: {reason}")


def _parse_brackets(expr: str, text: str, pos: int) -> tuple[_Step, int]:
    """One ``[...]`` step starting at ``text[pos] == '['``; returns it and the position after ``]``."""
    start = pos
    pos += 1
    keys: list[str] = []
    indexes: list[Index] = []
    wildcard = False

    def skip_space() -> None:
        nonlocal pos
        while pos < len(text) and text[pos] == " ":
            pos += 1

    while True:
        skip_space()
        if pos >= len(text):
            raise _unsupported(expr, start, "'[' is never closed")
        ch = text[pos]
        if ch in "?(":
            raise _unsupported(expr, pos, "filter and script expressions ([?(...)], [(...)]) are not supported")
        if ch == "*":
            wildcard = True
            pos += 1
        elif ch in "'\"":
            key, pos = _parse_quoted(expr, text, pos)
            keys.append(key)
        else:
            item, pos = _parse_index(expr, text, pos)
            indexes.append(item)
        skip_space()
        if pos >= len(text):
            raise _unsupported(expr, start, "'[' is never closed")
        if text[pos] == "]":
            pos += 1
            break
        if text[pos] != ",":
            raise _unsupported(expr, pos, f"expected ',' or ']', found {text[pos]!r}")
        pos += 1
    written = text[start:pos]
    if wildcard:
        if keys or indexes:
            raise _unsupported(expr, start, "'*' cannot be combined with keys or indexes in one [...]")
        return _Step("all", (), written), pos
    if keys and indexes:
        raise _unsupported(expr, start, "keys and indexes cannot be mixed in one [...]")
    if keys:
        return _Step("key", tuple(keys), written), pos
    return _Step("index", tuple(indexes), written), pos


def _parse_quoted(expr: str, text: str, pos: int) -> tuple[str, int]:
    quote = text[pos]
    pos += 1
    chars: list[str] = []
    while pos < len(text):
        ch = text[pos]
        if ch == "\\" and pos + 1 < len(text):
            chars.append(text[pos + 1])
            pos += 2
            continue
        if ch == quote:
            return "".join(chars), pos + 1
        chars.append(ch)
        pos += 1
    raise _unsupported(expr, pos - 1, f"the key's quote {quote} is never closed")


def _parse_index(expr: str, text: str, pos: int) -> tuple[Index, int]:
    """An integer or a slice ``a:b`` (both ends optional)."""
    bounds: list[int | None] = []
    while True:
        while pos < len(text) and text[pos] == " ":
            pos += 1
        match = _INT.match(text, pos)
        if match:
            bounds.append(int(match.group()))
            pos = match.end()
        else:
            bounds.append(None)
        while pos < len(text) and text[pos] == " ":
            pos += 1
        if pos < len(text) and text[pos] == ":":
            if len(bounds) == 2:
                raise _unsupported(expr, pos, "slice steps ([a:b:c]) are not supported")
            pos += 1
            continue
        break
    if len(bounds) == 1:
        if bounds[0] is None:
            found = repr(text[pos]) if pos < len(text) else "the end"
            raise _unsupported(expr, pos, f"expected an index, a slice, a quoted key or '*', found {found}")
        return bounds[0], pos
    return slice(bounds[0], bounds[1]), pos


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _apply(steps: tuple[_Step, ...], value: Any) -> Any:
    if not steps:
        return value
    step, rest = steps[0], steps[1:]
    if step.kind == "all":
        if isinstance(value, dict):
            return {k: _apply(rest, v) for k, v in value.items()}
        if isinstance(value, list):
            return [_apply(rest, v) for v in value]
        raise FilterMiss(f"{step.text} needs an object or an array, found {_kind(value)}")
    if step.kind == "key":
        if not isinstance(value, dict):
            raise FilterMiss(f"{step.text} needs an object, found {_kind(value)}")
        for key in step.items:
            if key not in value:
                raise FilterMiss(f"no key {key!r} (the object has {', '.join(map(repr, value)) or 'no keys'})")
        if not step.several:
            return _apply(rest, value[step.items[0]])
        return {k: _apply(rest, value[k]) for k in step.items}
    if not isinstance(value, list):
        raise FilterMiss(f"{step.text} needs an array, found {_kind(value)}")
    selected: list[Any] = []
    for item in step.items:
        if isinstance(item, slice):
            selected.extend(value[item])
        elif -len(value) <= item < len(value):
            selected.append(value[item])
        else:
            raise FilterMiss(f"index {item} is out of range (the array has {len(value)} elements)")
    if not step.several:
        return _apply(rest, selected[0])
    return [_apply(rest, v) for v in selected]


# --------------------------------------------------------------------------- records


def record_format(content_type: str | None) -> str | None:
    """``csv`` or ``json`` for the content types DataProcessing reads, else None (parameters ignored)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media in CSV_CONTENT_TYPES:
        return CSV
    if media in JSON_CONTENT_TYPES:
        return JSON
    return None


def read_record(raw: bytes, fmt: str) -> Any:
    """A record as a JSON value (a CSV row: a list of strings); raises ``ValueError``."""
    text = raw.decode("utf-8")
    if fmt == CSV:
        rows = list(csv.reader(io.StringIO(text)))
        if len(rows) != 1:
            raise ValueError(f"a CSV record must be one row, this one has {len(rows)}")
        return rows[0]
    return json.loads(text)


def write_record(value: Any, fmt: str) -> bytes:
    """A JSON value as one line's bytes (no ``\\n``): a CSV row (an array's items, else one field) or compact JSON."""
    if fmt == JSON:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    fields = value if isinstance(value, list) else [value]
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow([_csv_field(v) for v in fields])
    return out.getvalue().encode("utf-8")


def _csv_field(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def split_outputs(body: bytes, fmt: str, count: int) -> list[Any]:
    """One output per record of a payload of ``count`` records; raises ``ValueError`` when the counts differ.

    CSV: the body's lines, each a row. JSON: the whole body for one record; for several, its
    lines (JSON Lines) when there is one per record, else the elements of a JSON array.
    """
    text = body.decode("utf-8")
    lines = text.split("\n")
    if lines and lines[-1].strip() == "":
        lines.pop()
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    if fmt == CSV:
        if len(lines) != count:
            raise ValueError(f"the response has {len(lines)} lines for {count} records")
        return [read_record(line.encode("utf-8"), CSV) for line in lines]
    if count == 1:
        return [json.loads(text)]
    if len(lines) == count:
        try:
            return [json.loads(line) for line in lines]
        except ValueError:
            pass  # not JSON Lines: perhaps one JSON array spread over lines
    try:
        whole = json.loads(text)
    except ValueError:
        raise ValueError(f"the response is neither {count} JSON lines nor a JSON array ({len(lines)} lines)") from None
    if not isinstance(whole, list):
        raise ValueError(f"the response is one JSON value ({_kind(whole)}) for {count} records")
    if len(whole) != count:
        raise ValueError(f"the response is a JSON array of {len(whole)} elements for {count} records")
    return whole


# --------------------------------------------------------------------------- DataProcessing


@dataclass(frozen=True)
class DataProcessing:
    """SageMaker's ``DataProcessing`` of a transform: the input filter, the join and the output filter.

    Records are read in the format of ``ContentType``; responses in that of ``Accept`` when it
    names a CSV or JSON type, else in the input's. The joined record is written in the input's
    format, an output that is not joined in the output's.
    """

    input_format: str
    output_format: str
    input_filter: JSONPath
    output_filter: JSONPath
    join: bool

    @classmethod
    def from_settings(
        cls,
        *,
        content_type: str | None,
        accept: str | None,
        split_type: str,
        input_filter: str,
        output_filter: str,
        join_source: str,
    ) -> DataProcessing | None:
        """The processing the settings ask for, None when they ask for none; ``ValueError`` for bad settings."""
        if join_source not in ("None", "Input"):
            raise ValueError(f"JoinSource must be None or Input, got {join_source!r}")
        in_path, out_path = parse(input_filter), parse(output_filter)
        if in_path.identity and out_path.identity and join_source == "None":
            return None
        fmt = record_format(content_type)
        if fmt is None:
            raise ValueError(
                "DataProcessing needs ContentType text/csv or a JSON type "
                f"({', '.join(JSON_CONTENT_TYPES)}) to read records, got {content_type!r}"
            )
        if split_type != "Line":
            raise ValueError(f"DataProcessing needs SplitType Line (one record per line), got {split_type!r}")
        return cls(fmt, record_format(accept) or fmt, in_path, out_path, join_source == "Input")

    @property
    def splits_outputs(self) -> bool:
        """Whether responses are cut into one output per record (to join or filter them)."""
        return self.join or not self.output_filter.identity

    def filter_input(self, record: bytes, number: int) -> bytes:
        """What of record ``number`` (1-based) is sent: ``InputFilter`` applied; raises :class:`FileError`."""
        if self.input_filter.identity:
            return record
        value = self._read(record, number)
        return write_record(_select(self.input_filter, "InputFilter", value, number), self.input_format)

    def outputs(self, body: bytes, first: int, count: int, label: str) -> list[Any]:
        """The outputs of one response, one per record; raises an ``OutputMismatch`` :class:`FileError`."""
        try:
            return split_outputs(body, self.output_format, count)
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors too
            raise FileError("OutputMismatch", f"{label}: {exc}", first) from None

    def finish(self, record: bytes, output: Any, number: int) -> bytes:
        """The output line of record ``number`` (no ``\\n``): joined to ``record`` (as read) and filtered."""
        value, fmt = output, self.output_format
        if self.join:
            fmt = self.input_format
            source = self._read(record, number)
            if fmt == CSV:
                value = source + (output if isinstance(output, list) else [output])
            elif isinstance(source, dict):
                value = {**source, JOIN_KEY: output}
            else:
                raise FileError(
                    "JoinError",
                    f"JoinSource Input needs a JSON object per record to add {JOIN_KEY} to; record {number} is {_kind(source)}",
                    number,
                )
        if not self.output_filter.identity:
            value = _select(self.output_filter, "OutputFilter", value, number)
        return write_record(value, fmt)

    def _read(self, record: bytes, number: int) -> Any:
        try:
            return read_record(record, self.input_format)
        except ValueError as exc:
            what = "a CSV row" if self.input_format == CSV else "JSON"
            raise FileError("CorruptInput", f"record {number} is not {what}: {exc}", number) from None


def _select(path: JSONPath, name: str, value: Any, number: int) -> Any:
    try:
        return path.apply(value)
    except FilterMiss as exc:
        raise FileError("FilterError", f"{name} {path.expr!r} selects nothing in record {number}: {exc}", number) from None
