"""The documentation: the YAML reference generated from the schema, its freshness, and the README's links and length.

`make docs` (a prerequisite of `make test`) builds the site with `mkdocs build --strict`, which fails
on a broken link or anchor inside docs/; these tests cover what that build does not see.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from batchscore.spec import json_schema
from batchscore.spec.reference import main, missing_descriptions, render

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "include" / "schema" / "deployment.schema.json"
REFERENCE = REPO / "docs" / "reference" / "yaml.md"


def test_yaml_reference_in_the_repository_is_what_the_schema_gives() -> None:
    committed = REFERENCE.read_text(encoding="utf-8")
    assert committed == render(json.loads(SCHEMA.read_text(encoding="utf-8"))), "regenerate it with `make schema`"


def test_every_key_of_the_deployment_yaml_has_a_description() -> None:
    assert missing_descriptions(json_schema()) == [], (
        "give these fields a description (Field(description=...) in plugins/batchscore/spec/), then run `make schema`"
    )


def test_missing_descriptions_names_the_object_and_the_key() -> None:
    schema = {
        "$defs": {
            "Outer": {"properties": {"inner": {"$ref": "#/$defs/Inner"}, "bare": {"type": "string"}}},
            "Inner": {"description": "An inner block.", "properties": {"x": {"type": "integer", "description": "X."}}},
        }
    }
    assert missing_descriptions(schema) == ["Outer.bare"]


def test_a_table_per_object_with_type_default_allowed_values_and_description() -> None:
    schema = {
        "$defs": {
            "EndpointSpec": {
                "description": "An endpoint.",
                "required": ["endpoint_name"],
                "properties": {
                    "endpoint_name": {"type": "string", "pattern": "^[a-z]+$", "description": "The DAG id."},
                    "settings": {"$ref": "#/$defs/Settings", "default": {"size": 10}, "description": "Batch settings."},
                },
            },
            "Settings": {
                "description": "Batch settings.",
                "properties": {
                    "size": {
                        "anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}],
                        "default": 10,
                        "description": "Files per mini-batch | or none.",
                    },
                    "mode": {"type": "string", "enum": ["warm", "cold"], "default": "warm", "description": "``warm``."},
                },
            },
        }
    }
    page = render(schema)
    assert "## EndpointSpec\n\nAn endpoint file (`deployments: [...]`): the top level of a YAML file." in page
    assert "| `endpoint_name` | string | *required* | matches `^[a-z]+$` | The DAG id. |" in page
    assert "| `settings` | [Settings](#settings) | each key's default |  | Batch settings. |" in page
    assert "## Settings\n\nUnder `settings`.\n\nBatch settings." in page
    assert "| `size` | integer | `10` | ≥ 1 | Files per mini-batch \\| or none. |" in page
    assert "| `mode` | string | `warm` | `warm`, `cold` | `warm`. |" in page


def test_a_definition_that_is_not_an_object_is_a_sentence_of_its_allowed_values() -> None:
    schema = {
        "$defs": {
            "EndpointSpec": {"properties": {"mode": {"$ref": "#/$defs/Mode", "description": "How."}}},
            "Mode": {"type": "string", "enum": ["warm", "cold"], "description": "A worker mode."},
        }
    }
    page = render(schema)
    assert "| `mode` | [Mode](#mode) | none |  | How. |" in page
    assert "## Mode\n\nUnder `mode`.\n\nA worker mode.\n\nA string: `warm`, `cold`.\n" in page


def test_the_reference_has_a_row_for_every_key_of_every_object() -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", render(schema), flags=re.M | re.S))
    assert sorted(sections) == sorted(schema["$defs"])
    for name, definition in schema["$defs"].items():
        keys = re.findall(r"^\| `([^`]+)` \|", sections[name], flags=re.M)
        assert keys == list(definition["properties"]), name


def test_check_refuses_a_stale_page_and_says_how_to_regenerate_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "yaml.md"
    assert main([str(SCHEMA), str(page)]) == 0
    assert main(["--check", str(SCHEMA), str(page)]) == 0
    page.write_text(page.read_text(encoding="utf-8").replace("The DAG id", "The DAG"), encoding="utf-8")
    assert main(["--check", str(SCHEMA), str(page)]) == 1
    assert capsys.readouterr().err == f"{page} is not what {SCHEMA} gives: regenerate both with `make schema`\n"


def test_readme_is_short_and_its_links_lead_to_files_of_the_repository() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250, "README.md is the front page: move reference material into docs/"
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert "docs/reference/yaml.md" in links
    missing = [link for link in links if "://" not in link and not (REPO / link).exists()]
    assert missing == []


def test_every_page_under_docs_is_in_the_site_navigation() -> None:
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md"))
    assert [page for page in pages if f": {page}\n" not in nav] == []


def test_no_page_under_docs_links_out_of_docs() -> None:
    """The site is built from docs/ alone: a link to ../README.md (or any file outside docs/) is broken there,
    and mkdocs --strict does not see it (it checks links between pages only)."""
    docs = (REPO / "docs").resolve()
    outside = []
    for page in sorted(docs.rglob("*.md")):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target and not target.startswith("mailto:"):
                if not (page.parent / target).resolve().is_relative_to(docs):
                    outside.append(f"{page.relative_to(docs)}: {target}")
    assert outside == []
