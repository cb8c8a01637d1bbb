"""The Batch scoring tab against a real api-server, scheduler and DAG run, in a real (headless) Chromium.

One LocalAirflow stack for the module, with authentication on (no all-admins shortcut): the simple
auth manager's users ``admin``, ``viewer`` and ``outsider``, and a subclass of it
(:data:`AUTH_MANAGER`) that hides the test's DAG from ``outsider`` though its role is admin, so
"a user who may not see the DAG" is a real auth-manager decision (``is_authorized_dag``).

The run is the repository's DAG file over the iris example's 15 files in 3 mini-batches of 5, with a
script that fails mb-00001 (iris-005.csv) until a ``fixed`` file is next to the model, and holds
mb-00002 (iris-010.csv) until a ``gate`` file is: the run is caught while it runs without any timing.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from batchscore.airflowapi import LocalAirflowError
from batchscore.localairflow import LocalAirflow
from tests.chromium import Browser, find_chromium
from tests.helpers import deployment_file

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.docker, pytest.mark.scheduler]

DAG_ID = "ui-demo"
DEPLOYMENT = "test-deployment"
PASSWORDS = {"admin": "admin-secret", "viewer": "viewer-secret", "outsider": "outsider-secret"}
AUTH_MANAGER = '''
"""The simple auth manager, except that the user `outsider` may not see the DAG `ui-demo` (tests/test_ui_browser.py)."""
from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager


class OneDagHidden(SimpleAuthManager):
    def is_authorized_dag(self, *, method, user, access_entity=None, details=None):
        if user.get_name() == "outsider" and details is not None and details.id == "ui-demo":
            return False
        return super().is_authorized_dag(method=method, user=user, access_entity=access_entity, details=details)
'''
SCRIPT = """
import os
import time

import pandas as pd

MODEL = os.environ["AZUREML_MODEL_DIR"]


def init():
    pass


def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    if "iris-005.csv" in names and not os.path.exists(os.path.join(MODEL, "fixed")):
        raise ValueError("cannot score iris-005.csv: sensor offline")
    while "iris-010.csv" in names and not os.path.exists(os.path.join(MODEL, "gate")):
        time.sleep(0.2)
    rows = [pd.read_csv(p).assign(file=os.path.basename(p)) for p in mini_batch]
    return pd.concat(rows, ignore_index=True)[["file", "id"]]
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, iris_example: Path) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("ui")
    model, code, auth = root / "model", root / "code", root / "auth"
    for folder in (model, code, auth):
        folder.mkdir()
    (code / "score.py").write_text(SCRIPT)
    (auth / "batchscore_ui_test_auth.py").write_text(AUTH_MANAGER)
    (root / "passwords.json").write_text(json.dumps(PASSWORDS))
    deployments = root / "deployments"
    deployment_file(
        deployments,
        model=model,
        code=code,
        inputs=iris_example / "data",
        endpoint=DAG_ID,
        settings={"mini_batch_size": 5, "retry_settings": {"max_retries": 0, "timeout": 600}},
        resources={"instance_count": 2},
    )
    dags = root / "dags"
    dags.mkdir()
    shutil.copy(REPO / "dags" / "batchscore_deployments.py", dags)
    env = {
        "BATCHSCORE_DEPLOYMENTS_DIR": str(deployments),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer,outsider:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(root / "passwords.json"),
        "AIRFLOW__CORE__AUTH_MANAGER": "batchscore_ui_test_auth.OneDagHidden",
        "PYTHONPATH": os.pathsep.join(p for p in (str(auth), os.environ.get("PYTHONPATH")) if p),
    }
    af = LocalAirflow(root / "airflow", dags, env=env)
    af.start()
    try:
        af.login("admin", PASSWORDS["admin"])
        af.wait_for_dag(DAG_ID)
        run_id = af.trigger(DAG_ID)
        yield {"af": af, "run_id": run_id, "model": model}
    finally:
        af.stop()


def _states(af: LocalAirflow, run_id: str) -> dict[tuple[str, int], dict]:
    return {(t["task_id"], t["map_index"]): t for t in af.task_instances(DAG_ID, run_id)}


def _wait_until_held(af: LocalAirflow, run_id: str, timeout: float = 300) -> None:
    """Until mb-00000 succeeded, mb-00001 failed and mb-00002 runs (held by the gate)."""
    want = {0: "success", 1: "failed", 2: "running"}
    deadline = time.monotonic() + timeout
    while True:
        tis = _states(af, run_id)
        got = {i: tis.get((f"{DEPLOYMENT}.score", i), {}).get("state") for i in want}
        if got == want:
            return
        if time.monotonic() > deadline or af.dag_run(DAG_ID, run_id)["state"] in ("success", "failed"):
            raise LocalAirflowError(f"the run never held as {want}: {got}")
        time.sleep(1)


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _urls(af: LocalAirflow, run_id: str) -> dict[str, str]:
    run = f"{quote(DAG_ID, safe='')}/{quote(run_id, safe='')}"
    return {
        "page": f"{af.base_url}/batchscore/runs/{run}",
        "report": f"{af.base_url}/batchscore/api/runs/{run}",
        "summary": f"{af.base_url}/batchscore/api/runs/{run}/files/{DEPLOYMENT}/summary",
    }


def test_the_plugin_is_registered_by_its_entry_point_and_adds_a_dag_run_tab(stack: dict) -> None:
    found = [ep for ep in importlib.metadata.entry_points(group="airflow.plugins") if ep.name == "batchscore"]
    assert [ep.value for ep in found][:1] == ["batchscore.ui.plugin:BatchScorePlugin"]
    plugins = {p["name"]: p for p in stack["af"].api("GET", "/api/v2/plugins")["plugins"]}
    plugin = plugins["batchscore"]
    assert [(a["url_prefix"], a["name"]) for a in plugin["fastapi_apps"]] == [("/batchscore", "batchscore")]
    view = plugin["external_views"][0]
    assert (view["name"], view["destination"], view["href"]) == ("Batch scoring", "dag_run", "/batchscore/runs/{DAG_ID}/{RUN_ID}")


def test_the_endpoints_enforce_airflows_auth_manager(stack: dict) -> None:
    af: LocalAirflow = stack["af"]
    urls = _urls(af, stack["run_id"])
    viewer = af.fetch_token("viewer", PASSWORDS["viewer"])
    outsider = af.fetch_token("outsider", PASSWORDS["outsider"])
    for what in ("page", "report", "summary"):
        assert _get(urls[what])[0] == 401, what  # no credential
        assert _get(urls[what], "not-a-jwt")[0] == 403, what  # a credential the auth manager refuses
        assert _get(urls[what], outsider)[0] == 403, what  # may not see this DAG
    # The auth manager's own decision, as Airflow's REST API applies it to the same user.
    assert _get(f"{af.base_url}/api/v2/dags/{DAG_ID}", outsider)[0] == 403
    assert _get(f"{af.base_url}/api/v2/dags/{DAG_ID}", viewer)[0] == 200
    status, body = _get(urls["report"], viewer)
    assert status == 200
    report = json.loads(body)
    assert (report["dag_id"], report["run_id"], [d["name"] for d in report["deployments"]]) == (
        DAG_ID,
        stack["run_id"],
        [DEPLOYMENT],
    )
    assert _get(urls["page"], viewer)[0] == 200


def test_the_tab_in_a_browser_shows_a_running_then_a_finished_run_and_its_clear_button_reruns_a_mini_batch(
    stack: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if find_chromium() is None:
        pytest.skip("Chromium is not installed: apt-get install chromium (.ci/run installs it)")
    af: LocalAirflow = stack["af"]
    run_id = stack["run_id"]
    _wait_until_held(af, run_id)
    urls = _urls(af, run_id)
    section = f"document.querySelector('section[data-deployment=\"{DEPLOYMENT}\"]')"

    def shown(key: str) -> str:
        return f"({section}?.querySelector('[data-key=\"{key}\"]')?.textContent ?? null)"

    def numbers() -> dict[str, str]:
        keys = ["phase", "mini-batches", "mini-batches-failed", "mini-batches-running", "items", "items-failed", "rows"]
        return {k: b.evaluate(shown(k)) for k in keys}

    shots = []
    with Browser() as b:
        # As Airflow's UI login leaves it: the auth manager's JWT in the `_token` cookie.
        b.set_cookie("_token", af.token or "", af.base_url)
        b.open(urls["page"])
        b.wait_for(f"{shown('mini-batches')} === '2 of 3 done'", what="the running run's progress")
        assert numbers() == {
            "phase": "scoring",
            "mini-batches": "2 of 3 done",
            "mini-batches-failed": "1",
            "mini-batches-running": "1",
            "items": "10 of 15 done",
            "items-failed": "5",
            "rows": "50",
        }
        assert b.evaluate("document.getElementById('run-state').textContent") == "running"
        assert b.evaluate(f"{section}.querySelector('rect.running[data-mini-batch=\"mb-00002\"]') !== null")
        assert b.evaluate(f"{section}.querySelectorAll('rect.succeeded, rect.failed').length") == 2
        failure = b.evaluate(f"{section}.querySelector('tr[data-mini-batch=\"mb-00001\"]').innerText")
        assert "ValueError: cannot score iris-005.csv: sensor offline" in failure
        assert b.evaluate(shown("rows-per-second")) not in ("–", None)
        shots.append(b.screenshot(tmp_path / "batch-scoring-running.png"))

        (stack["model"] / "gate").touch()
        # Not reloaded: the open page polls its report and draws the run to its end.
        ended = "['success', 'failed'].includes(document.getElementById('run-state').textContent)"
        b.wait_for(f"{shown('phase')} === 'merged' && {ended}", timeout=300, what="the page to show the run's end")
        assert b.evaluate("document.getElementById('run-state').textContent") == af.dag_run(DAG_ID, run_id)["state"]
        assert numbers() == {
            "phase": "merged",
            "mini-batches": "3 of 3 done",
            "mini-batches-failed": "1",
            "mini-batches-running": "0",
            "items": "15 of 15 done",
            "items-failed": "5",
            "rows": "100",
        }
        assert b.evaluate(shown("summary-status")) == "Merged: succeeded_with_failures, 100 rows."
        assert b.evaluate(shown("eta")) == "0s"
        links = b.evaluate(
            f"[...{section}.querySelectorAll('a[data-link]')].map(a => a.getAttribute('data-link') + '=' + a.textContent)"
        )
        assert links == [
            "output=predictions.csv",
            "summary=summary.json",
            "ledger=processed_mini-batches.csv",
            "errors=errors.csv",
        ]
        # The summary link downloads the run's summary.json, with the viewer's session.
        summary = b.evaluate(f"fetch({section}.querySelector('a[data-link=summary]').href).then(r => r.json())")
        assert (summary["run_id"], summary["status"], summary["rows"]) == (run_id, "succeeded_with_failures", 100)
        shots.append(b.screenshot(tmp_path / "batch-scoring-finished.png"))

        # The same page as Airflow's UI shows it: the DAG run's "Batch scoring" tab, in its frame.
        b.open(f"{af.base_url}/dags/{quote(DAG_ID, safe='')}/runs/{quote(run_id, safe='')}/plugin/batchscore")
        framed = (
            "(() => { const f = document.querySelector('iframe[title=\"Batch scoring\"]');"
            f' const e = f && f.contentDocument && f.contentDocument.querySelector(\'section[data-deployment="{DEPLOYMENT}"]'
            ' [data-key="phase"]\'); return e ? e.textContent : null; })()'
        )
        assert b.wait_for(framed, timeout=90, what="the tab on Airflow's DAG-run page") == "merged"
        shots.append(b.screenshot(tmp_path / "batch-scoring-tab-in-airflow.png"))
        b.open(urls["page"])
        b.wait_for(f"{shown('phase')} === 'merged'", what="the finished run's report, again")

        button = f"{section}.querySelector('button.clear[data-map-index=\"1\"]')"
        before = _states(af, run_id)
        # A viewer sees the run, but Airflow refuses them the clear: the button calls its API as the viewer.
        b.set_cookie("_token", af.fetch_token("viewer", PASSWORDS["viewer"]), af.base_url)
        b.open(urls["page"])
        b.wait_for(f"{shown('phase')} === 'merged'", what="the finished run's report, as a viewer")
        b.evaluate(f"{button}.click()")
        b.evaluate(f"{button}.click()")
        refused = b.wait_for(
            f"{button}.parentElement.querySelector('.clear-result').textContent.startsWith('Not')", what="the refusal"
        )
        assert refused and b.evaluate(f"{button}.parentElement.querySelector('.clear-result').textContent") == (
            "Not cleared (HTTP 403): Airflow refused: you may not clear this DAG's tasks"
        )
        assert {k: (t["state"], t["try_number"]) for k, t in _states(af, run_id).items()} == {
            k: (t["state"], t["try_number"]) for k, t in before.items()
        }  # nothing cleared

        # The fix is in: as admin, the failure's button clears mb-00001 and the merge, through Airflow's REST API.
        b.set_cookie("_token", af.token or "", af.base_url)
        b.open(urls["page"])
        b.wait_for(f"{shown('phase')} === 'merged'", what="the finished run's report, as admin")
        (stack["model"] / "fixed").touch()
        b.evaluate(f"{button}.click()")  # asks to confirm
        assert b.evaluate(f"{button}.textContent") == "Confirm: clear and rerun"
        b.evaluate(f"{button}.click()")
        result = b.wait_for(f"{button}.parentElement.querySelector('.clear-result[data-cleared]')?.textContent", what="the clear")
        assert result == "Cleared mb-00001 and 1 downstream task(s): the scheduler runs them again."
        assert af.wait_for_run(DAG_ID, run_id, timeout=300) == "success"
        after = _states(af, run_id)
        score = f"{DEPLOYMENT}.score"
        assert after[(score, 1)]["state"] == "success"
        assert after[(score, 1)]["try_number"] == before[(score, 1)]["try_number"] + 1
        assert after[(score, 0)]["try_number"] == before[(score, 0)]["try_number"]  # not rerun
        b.open(urls["page"])
        b.wait_for(f"{shown('no-failures')} === 'No failures.'", what="the report after the rerun")
        assert b.evaluate(shown("summary-status")) == "Merged: succeeded, 150 rows."
        shots.append(b.screenshot(tmp_path / "batch-scoring-after-clear.png"))
    for shot in shots:
        assert shot.stat().st_size > 10_000  # a drawn page, not a blank one
    with capsys.disabled():  # in the test output (so CI's) also when the test passes
        print("".join(f"\nscreenshot: {shot}" for shot in shots))
