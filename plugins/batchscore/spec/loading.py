"""Loading a deployment YAML: read and parse it, pick its layout, validate it, and map its keys to lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from batchscore.errors import DeploymentSpecError, SpecIssue
from batchscore.spec.endpoint import DeploymentFile, EndpointSpec
from batchscore.spec.issues import booleans_for_numbers, dotted, validation_issues

#: The ``$schema`` of Azure's batch *endpoint* YAML (``endpoint.yml``), which sits beside its deployments' folders.
AZURE_ENDPOINT_SCHEMA = "batchEndpoint.schema.json"


def load_endpoint(path: Path | str) -> EndpointSpec:
    """Load and validate one YAML file; raises :class:`DeploymentSpecError` naming file, line and key."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DeploymentSpecError(path, [SpecIssue(None, None, f"cannot read the file: {exc}")]) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = _line_column(raw, exc.start)
        raise DeploymentSpecError(
            path,
            [
                SpecIssue(
                    line,
                    None,
                    f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at column {column} cannot be decoded "
                    "(a binary file, or text in another encoding? save it as UTF-8)",
                )
            ],
        ) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)  # noqa: S506 - SafeLoader
    except yaml.MarkedYAMLError as exc:
        raise DeploymentSpecError(path, [_syntax_issue(exc)]) from exc
    except yaml.reader.ReaderError as exc:  # a character YAML refuses, such as NUL: no mark, a position
        line, column = _line_column(text, exc.position)
        raise DeploymentSpecError(
            path,
            [
                SpecIssue(
                    line,
                    None,
                    f"character #x{exc.character:04x} at column {column} is not allowed in YAML (a binary file?)",
                )
            ],
        ) from exc
    except yaml.YAMLError as exc:
        raise DeploymentSpecError(path, [SpecIssue(1, None, f"YAML error: {exc}")]) from exc
    if node is None:
        empty = "the file is empty" if not text.strip() else "the file holds no keys, only comments"
        raise DeploymentSpecError(path, [SpecIssue(1, None, empty)])
    if not isinstance(data, dict):
        raise DeploymentSpecError(
            path,
            [SpecIssue(node.start_mark.line + 1, None, f"the top level must be a mapping of keys, not {_kind(data)}")],
        )
    lines, duplicates = _line_map(node)
    if duplicates:
        raise DeploymentSpecError(path, duplicates)

    schema = data.get("$schema")
    if isinstance(schema, str) and schema.rstrip("/").endswith(AZURE_ENDPOINT_SCHEMA):
        message = (
            f"this is Azure's batch endpoint file ({AZURE_ENDPOINT_SCHEMA}), not a deployment; batchscore makes the "
            "endpoint (the DAG) from each deployment's endpoint_name, so move this file out of the deployments folder"
        )
        raise DeploymentSpecError(path, [SpecIssue(lines.get(("$schema",)), "$schema", message)])
    model = _layout(data)
    context = {"base_dir": path.parent.resolve()}
    booleans = booleans_for_numbers(model, data, lines)
    try:
        spec = model.model_validate(data, context=context)
    except ValidationError as exc:
        named = {issue.key for issue in booleans}
        issues = [i for i in validation_issues(exc, data, lines, model, context["base_dir"]) if i.key not in named]
        raise DeploymentSpecError(path, sorted(issues + booleans, key=lambda i: i.line or 0)) from None
    if booleans:
        raise DeploymentSpecError(path, booleans)
    endpoint = spec.to_endpoint(context) if isinstance(spec, DeploymentFile) else spec
    assert isinstance(endpoint, EndpointSpec)
    endpoint._source = path
    return endpoint


def _line_column(text: str | bytes, position: int) -> tuple[int, int]:
    """The 1-based line and column of ``position`` in ``text``."""
    newline = "\n" if isinstance(text, str) else b"\n"
    start = text.rfind(newline, 0, position) + 1  # type: ignore[arg-type]
    return text.count(newline, 0, position) + 1, position - start + 1  # type: ignore[arg-type]


def _syntax_issue(exc: yaml.MarkedYAMLError) -> SpecIssue:
    """A YAML syntax error on the line to fix: where an unclosed quote or bracket opens, else where it broke."""
    problem, context = exc.problem or "", exc.context or ""
    context_line = exc.context_mark.line + 1 if exc.context_mark else None
    at_end = "end of stream" in problem or "<stream end>" in problem
    mark = exc.context_mark if (at_end or exc.problem_mark is None) and exc.context_mark else exc.problem_mark
    line = mark.line + 1 if mark else None
    message = f"YAML syntax error: {problem or context}"
    if context and problem:
        message += f" ({context}{f' that starts on line {context_line}' if context_line not in (None, line) else ''})"
    if "'\\t'" in problem:
        message += "; indent with spaces, not tabs"
    elif at_end and context_line is not None:
        message += "; is a quote or bracket not closed?"
    elif "expected <block end>" in problem:
        message += "; check the indentation of this line"
    return SpecIssue(line, None, message)


def _kind(value: Any) -> str:
    """What a YAML value is, in words: 'a list', 'a string', 'null'..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    names = {str: "a string", list: "a list", dict: "a mapping"}
    return next((n for t, n in names.items() if isinstance(value, t)), f"a {type(value).__name__}")


def _layout(data: dict) -> type[BaseModel]:
    """The endpoint file (``deployments:``) or Azure's deployment file.

    A file with none of a deployment's own keys is taken for an endpoint file, so that one
    without ``deployments`` is told just that, not that ``name``, ``model``, ... are missing.
    """
    deployment_only = set(DeploymentFile.model_fields) - set(EndpointSpec.model_fields)
    if "deployments" in data or not deployment_only & set(data):
        return EndpointSpec
    return DeploymentFile


def key_line(path: Path, *key_paths: tuple) -> int | None:
    """The 1-based line of the first of ``key_paths`` present in the YAML file, if any.

    For problems found after loading (across files), e.g. ``("deployments", 1, "output", "path")``.
    """
    try:
        lines, _ = _line_map(yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return next((lines[k] for k in key_paths if k in lines), None)


def _line_map(node: yaml.Node | None) -> tuple[dict[tuple, int], list[SpecIssue]]:
    """Map each key path of the YAML document to its 1-based line; report duplicate keys."""
    lines: dict[tuple, int] = {}
    duplicates: list[SpecIssue] = []

    def walk(n: yaml.Node, path: tuple) -> None:
        if isinstance(n, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in n.value:
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key in seen:
                    duplicates.append(SpecIssue(line, dotted(path + (key,)), f"key appears twice (first on line {seen[key]})"))
                seen[key] = line
                lines[path + (key,)] = line
                walk(value_node, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                lines.setdefault(path + (i,), item.start_mark.line + 1)
                walk(item, path + (i,))

    if node is not None:
        lines[()] = node.start_mark.line + 1
        walk(node, ())
    return lines, duplicates
