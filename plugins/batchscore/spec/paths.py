"""The path policy: paths resolved against the YAML's folder and confined to BATCHSCORE_ALLOWED_ROOTS, that they exist,
and an output folder apart from the input folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, ValidationInfo

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


#: What to do about an output folder that is, or holds, the input folder (see :func:`output_overlap`).
OUTPUT_OVERLAP_ADVICE = (
    "the plan never reads files inside the output folder, so no input file would be left; "
    "write the output to another folder (a subfolder of the input folder is fine)"
)


def output_overlap(input_path: Path, output_path: Path) -> str | None:
    """Why ``output_path`` cannot be the output folder of ``input_path``, or ``None`` when it can.

    The plan never reads a file inside the output folder (the run folders of this and earlier
    runs), so an output folder that is the input folder, or holds it, leaves no input at all.
    An output folder strictly inside the input folder is fine: only its files are skipped.
    Both paths are compared resolved (symbolic links followed), as the plan compares them.
    """
    real_input, real_output = Path(input_path).resolve(), Path(output_path).resolve()
    if real_output == real_input:
        return f"{output_path} is the input folder"
    if real_input.is_relative_to(real_output):
        return f"{output_path} holds the input folder {input_path}"
    return None
