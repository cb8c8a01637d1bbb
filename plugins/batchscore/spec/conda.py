"""Azure's environment conda file, read for what batchscore builds images from: its ``pip:`` dependencies.

conda itself is not available to batchscore (images are built with pip from wheels, offline), so:

* ``python`` and ``pip`` among the conda dependencies are **ignored**, with a note the DAG's docs show: the
  base image's Python and pip are used (batchscore's scoring base: Python 3.11);
* ``name``, ``channels`` and ``prefix`` are ignored with a note too (they only mean something to conda);
* any **other conda package** is **refused**: it would be missing at run time, far from its cause; the
  message says to list it under ``pip:`` with pip's name;
* **pip options** (``--extra-index-url``, ``-r``, ``-e``) are refused: the wheels are downloaded by the
  Airflow worker's own pip, whose configuration (``pip.conf``) says where from;
* ``variables`` and other keys are refused (``settings.environment_variables`` sets variables).

No Airflow here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

#: Conda dependencies the base image stands for.
PROVIDED_BY_BASE = ("python", "pip")
#: Keys of a conda file that mean something to conda only.
CONDA_ONLY_KEYS = ("name", "channels", "prefix")


@dataclass(frozen=True)
class CondaDependencies:
    """What an image is built from: the pip requirements, and notes on what was ignored."""

    pip: tuple[str, ...]
    ignored: tuple[str, ...]


def _package(spec: str) -> str:
    """The package name of a conda match spec: ``conda-forge::numpy>=1.2`` gives ``numpy``."""
    return re.split(r"[=<>!~ \[]", spec.split("::")[-1], maxsplit=1)[0].strip().lower()


def _text(value: object) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def read_conda_file(path: Path) -> CondaDependencies:
    """The pip dependencies of the conda file at ``path``; ValueError naming the file and the entry otherwise."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"conda file {path} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"conda file {path} must be a mapping with a dependencies list")
    ignored = [f"{key}: {_text(data[key])}" for key in CONDA_ONLY_KEYS if key in data]
    unknown = sorted(set(data) - {*CONDA_ONLY_KEYS, "dependencies"})
    if unknown:
        raise ValueError(
            f"conda file {path}: key {unknown[0]!r} is not supported (batchscore reads name, channels and "
            "dependencies; environment variables go in settings.environment_variables)"
        )
    dependencies = data.get("dependencies") or []
    if not isinstance(dependencies, list):
        raise ValueError(f"conda file {path}: dependencies must be a list")
    pip: list[str] = []
    for entry in dependencies:
        if isinstance(entry, dict) and set(entry) == {"pip"} and isinstance(entry["pip"], list):
            for requirement in entry["pip"]:
                text = str(requirement).strip()
                if text.startswith("-"):
                    raise ValueError(
                        f"conda file {path}: pip option {text!r} is not supported: the wheels are downloaded by the "
                        "Airflow worker's pip, so put index options in its configuration (pip.conf)"
                    )
                pip.append(text)
        elif isinstance(entry, (str, int, float)) and _package(str(entry)) in PROVIDED_BY_BASE:
            ignored.append(str(entry))
        elif isinstance(entry, str):
            raise ValueError(
                f"conda file {path}: conda package {entry!r} cannot be installed: batchscore builds images with "
                f"pip, not conda; list it under pip: with pip's name and version (e.g. {_package(entry)})"
            )
        else:
            raise ValueError(f"conda file {path}: dependency {entry!r} must be a conda package or a pip: list")
    return CondaDependencies(pip=tuple(pip), ignored=tuple(ignored))


__all__ = ["CONDA_ONLY_KEYS", "PROVIDED_BY_BASE", "CondaDependencies", "read_conda_file"]
