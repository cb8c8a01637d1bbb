"""The path policy: paths resolved against the YAML's folder and confined to BATCHSCORE_ALLOWED_ROOTS, that they exist,
and an output folder apart from the input folder; and the URIs of object storage (``s3://``, ``gs://``, ``abfs://``,
``abfss://``) that ``model.path``, ``input.path`` and ``output.path`` may be instead (:data:`Location`)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Union
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, ValidationInfo

#: Environment variable: the folders (absolute, separated by os.pathsep, ``:`` on Linux) that
#: every path of a deployment (model, code, input, output) must lie in once symbolic links and
#: ``..`` are resolved. Unset or empty: no confinement. Read on every validation, so the DAG
#: processor (YAML files) and the workers (run parameters) both check it where it is set.
ALLOWED_ROOTS_ENV = "BATCHSCORE_ALLOWED_ROOTS"


def allowed_roots() -> list[Path] | None:
    """The folders of ``BATCHSCORE_ALLOWED_ROOTS``, resolved; ``None`` when it is unset (no confinement)."""
    raw = os.environ.get(ALLOWED_ROOTS_ENV, "")
    roots = []
    for part in (p.strip() for p in raw.split(os.pathsep)):
        if not part:
            continue
        if not Path(part).is_absolute():
            raise ValueError(f"{ALLOWED_ROOTS_ENV} holds {part!r}, which is not an absolute path")
        roots.append(Path(part).resolve())
    return roots or None


def _confine(given: Path, joined: Path, resolved: Path) -> None:
    """Refuse a resolved path outside the allowed roots, saying whether ``..`` or a symlink led out."""
    roots = allowed_roots()
    if roots is None or any(resolved.is_relative_to(root) for root in roots):
        return
    lexical = Path(os.path.normpath(joined))
    if any(lexical.is_relative_to(root) for root in roots):
        how = "; a symbolic link on the way leads out of them"
    elif ".." in given.parts:
        how = "; its '..' leads out of them"
    else:
        how = ""
    raise ValueError(
        f"path {str(given)!r} resolves to {resolved}, outside the folders allowed by {ALLOWED_ROOTS_ENV} "
        f"({', '.join(str(r) for r in roots)}){how}"
    )


def _resolve(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    given = value
    if not value.is_absolute():
        if base is None:
            raise ValueError(f"relative path {str(value)!r} needs a base folder")
        value = Path(base) / value
    resolved = Path(value).resolve()
    _confine(given, Path(value), resolved)  # before any existence check: nothing is said of paths outside
    return resolved


def _must_exist(value: Path) -> Path:
    if not value.exists():
        raise ValueError(f"path {value} does not exist")
    return value


def _must_be_dir(value: Path) -> Path:
    if not value.is_dir():
        raise ValueError(f"path {value} does not exist or is not a folder")
    return value


#: A path, relative to the YAML file's folder unless absolute; resolved when loaded.
ResolvedPath = Annotated[Path, AfterValidator(_resolve)]
ExistingPath = Annotated[Path, AfterValidator(_resolve), AfterValidator(_must_exist)]
ExistingDir = Annotated[Path, AfterValidator(_resolve), AfterValidator(_must_be_dir)]


#: The URI schemes of object storage a location may have (``s3a`` and ``gcs`` are aliases Airflow knows).
REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "abfs", "abfss")
SUPPORTED_LOCATIONS = "s3://, gs://, abfs://, abfss://, file:// or a plain path"


def uri_scheme(text: str) -> str:
    """The scheme of ``text`` in lower case (``s3``), ``""`` for a plain path."""
    head, sep, _ = text.partition("://")
    return head.lower() if sep and head.replace("+", "").replace("-", "").replace(".", "").isalnum() else ""


def is_remote_location(value: str | os.PathLike[str]) -> bool:
    """Whether a location (as a deployment holds it) is on object storage: a ``str`` URI; a ``Path`` is local."""
    return isinstance(value, str) and uri_scheme(value) in REMOTE_SCHEMES


def _remote_uri(text: str) -> str:
    """A URI of object storage, checked for form: a bucket (or container), no credential; ``S3://`` as ``s3://``."""
    scheme = uri_scheme(text)
    text = scheme + text[len(scheme) :]
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise ValueError(f"{scheme}:// URI is malformed ({exc})") from None
    userinfo, _, bucket = parts.netloc.rpartition("@")
    if ":" in userinfo:
        raise ValueError(
            f"{scheme}:// URI holds a credential; credentials never go in the YAML: put them in an Airflow "
            "connection and name it with `connection:`"
        )
    if parts.query or parts.fragment:
        raise ValueError(
            f"{scheme}://{bucket}{parts.path}: a URI with a query (?...) or fragment (#...) is not a location; "
            "put tokens in an Airflow connection and name it with `connection:`"
        )
    if not bucket:
        raise ValueError(f"{scheme}:// URI names no bucket; write {scheme}://<bucket>/<prefix>/")
    if ".." in PurePosixPath(parts.path).parts:
        raise ValueError(f"{scheme}://{bucket}{parts.path}: '..' has no meaning on object storage; write the prefix out")
    return text


def _location(value: Any, info: ValidationInfo) -> Any:
    """A location as a deployment holds it: a ``str`` URI of object storage, or a resolved local ``Path``."""
    if isinstance(value, os.PathLike):
        return _resolve(Path(value), info)
    if not isinstance(value, str):
        return value  # the str | Path union says what is wrong
    scheme = uri_scheme(value)
    if scheme in REMOTE_SCHEMES:
        return _remote_uri(value)
    if scheme == "file":
        local = value.split("://", 1)[1]
        local = local.removeprefix("localhost")
        if not local.startswith("/"):
            raise ValueError(f"{value!r}: a file:// URI holds an absolute path (file:///data/in); or write the path alone")
        return _resolve(Path(local), info)
    if scheme:
        raise ValueError(f"{value!r}: the scheme {scheme}:// is not supported; use {SUPPORTED_LOCATIONS}")
    return _resolve(Path(value), info)


def _local_must_exist(value: str | Path) -> str | Path:
    return _must_exist(value) if isinstance(value, Path) else value


#: Where data is: a URI of object storage (kept as ``str``, normalized) or a local path (resolved as
#: :data:`ResolvedPath`; ``file:///data`` is the path ``/data``).
Location = Annotated[Union[str, Path], BeforeValidator(_location)]  # noqa: UP007 - pydantic reads it at run time
ExistingLocation = Annotated[Union[str, Path], BeforeValidator(_location), AfterValidator(_local_must_exist)]  # noqa: UP007


def same_or_inside(inner: str, outer: str) -> bool:
    """Whether the URI ``inner`` is ``outer`` or below it (compared as ``scheme://bucket/key`` with no trailing /)."""
    a, b = inner.rstrip("/"), outer.rstrip("/")
    return a == b or a.startswith(b + "/")


#: What to do about an output folder that is, or holds, the input folder (see :func:`output_overlap`).
OUTPUT_OVERLAP_ADVICE = (
    "the plan never reads files inside the output folder, so no input file would be left; "
    "write the output to another folder (a subfolder of the input folder is fine)"
)


def output_overlap(input_path: str | Path, output_path: str | Path) -> str | None:
    """Why ``output_path`` cannot be the output folder of ``input_path``, or ``None`` when it can.

    The plan never reads a file inside the output folder (the run folders of this and earlier
    runs), so an output folder that is the input folder, or holds it, leaves no input at all.
    An output folder strictly inside the input folder is fine: only its files are skipped.
    Both paths are compared resolved (symbolic links followed), as the plan compares them.
    """
    if isinstance(input_path, str) or isinstance(output_path, str):  # a URI: on object storage
        if not (isinstance(input_path, str) and isinstance(output_path, str)):
            return None  # one on object storage, one local: apart
        if same_or_inside(input_path, output_path):
            return (
                f"{output_path} is the input folder"
                if same_or_inside(output_path, input_path)
                else (f"{output_path} holds the input folder {input_path}")
            )
        return None
    real_input, real_output = Path(input_path).resolve(), Path(output_path).resolve()
    if real_output == real_input:
        return f"{output_path} is the input folder"
    if real_input.is_relative_to(real_output):
        return f"{output_path} holds the input folder {input_path}"
    return None
