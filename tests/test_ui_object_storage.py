"""The Batch scoring tab of a run whose run folder is on object storage, asked of the api-server's own app.

A real run (``dag.test()``, real containers) writes its run folder on the S3 server of the ``s3``
fixture; the worker host's mirror is then removed and the scratch folder pointed elsewhere, as on an
api-server that runs on another host. The report is asked of Airflow's api-server app
(:func:`airflow.api_fastapi.app.create_app`, which mounts the plugins Airflow finds, so the plugin
is reached through its entry point) with a FastAPI ``TestClient`` and a JWT of Airflow's own auth
manager: the same routes, security dependencies and database as the api-server's.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from batchscore_runtime.formats import run_key
from tests.helpers import S3_CONN, read_object, run_dag, s3_deployment

pytestmark = [pytest.mark.docker, pytest.mark.s3]


def _api_server() -> tuple[Any, dict[str, str]]:
    """A client of the api-server's app, and the headers of an admin's token from its auth manager."""
    from airflow.api_fastapi.app import create_app, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi.testclient import TestClient

    client = TestClient(create_app())
    token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
    return client, {"Authorization": f"Bearer {token}"}


@contextlib.contextmanager
def _connection_in_the_database(conn_id: str, value: str) -> Iterator[None]:
    from airflow.models import Connection
    from airflow.utils.session import create_session

    with create_session() as session:
        session.add(Connection.from_json(value, conn_id=conn_id))
    try:
        yield
    finally:
        with create_session() as session:
            session.query(Connection).filter(Connection.conn_id == conn_id).delete()


def test_the_report_of_a_run_on_object_storage_shows_its_mini_batches_and_records_without_a_mirror(
    airflow_db, iris_example: Path, tmp_path: Path, s3, monkeypatch
) -> None:
    path = s3_deployment(tmp_path, iris_example, s3)  # 15 files, 4 a mini-batch
    dag_run, _ = run_dag(path, monkeypatch)
    assert dag_run.state == "success"
    # The api-server's host: no mirror of the run folder.
    assert list((tmp_path / "scratch").glob("runs/*/*/_batchscore/plan.json")), "the run had no mirror here"
    shutil.rmtree(tmp_path / "scratch")
    monkeypatch.setenv("BATCHSCORE_SCRATCH_DIR", str(tmp_path / "api-server-scratch"))
    # Its connection: none at first, then one of the same id in the metadata database (read-only), found there as
    # the api-server finds one.
    monkeypatch.delenv(f"AIRFLOW_CONN_{S3_CONN.upper()}")
    monkeypatch.setenv("_AIRFLOW_PROCESS_CONTEXT", "server")  # what airflow.api_fastapi.main sets
    folder = f"{s3['uri']}/output/iris/{run_key(dag_run.run_id)}"
    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_urlsafe(64))  # HS512 wants >= 64 bytes
    client, auth = _api_server()
    url = f"/batchscore/api/runs/{quote(dag_run.dag_id, safe='')}/{quote(dag_run.run_id, safe='')}"

    assert client.get(url).status_code == 401  # Airflow's security dependency, as on the api-server
    # Before the api-server has the connection: the report says so, and what to do.
    unread = client.get(url, headers=auth).json()["deployments"][0]
    assert (unread["folder"], unread["links"], unread["progress"]["mini_batches_total"]) == (folder, {}, 0)
    assert unread["message"] == (
        f"The run folder {folder} cannot be read: {folder}: the Airflow connection 's3_test' does not exist; create it "
        "(UI: Admin > Connections; `airflow connections add s3_test --conn-json ...`; or the environment variable "
        "AIRFLOW_CONN_S3_TEST), or name an existing one"
    )
    with _connection_in_the_database(S3_CONN, s3["server"].connection_json(read_only=True)):
        answer = client.get(url, headers=auth)
        page = client.get(url.replace("/api/runs/", "/runs/"), headers=auth)
        files = client.get(f"{url}/files/test-deployment/output", headers=auth)
        _check_the_report(answer, folder)

    assert (page.status_code, page.headers["content-type"]) == (200, "text/html; charset=utf-8")
    assert (files.status_code, files.json()["detail"]) == (
        404,
        f"deployment 'test-deployment' of run {dag_run.run_id!r} has no run folder on this host",
    )
    assert not (tmp_path / "api-server-scratch").exists()  # nothing mirrored to answer


def _check_the_report(answer: Any, folder: str) -> None:
    """The report of the finished run: every mini-batch done, the summary, the records' URIs."""
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["state"], [d["name"] for d in body["deployments"]]) == ("success", ["test-deployment"])
    report = body["deployments"][0]
    assert (report["phase"], report["message"], report["folder"]) == ("merged", None, folder)
    progress = report["progress"]
    assert (progress["mini_batches_total"], progress["mini_batches_succeeded"], progress["mini_batches_failed"]) == (4, 4, 0)
    assert (progress["items_total"], progress["items_succeeded"], progress["rows"]) == (15, 15, 150)
    bars = [bar for lane in report["timeline"]["lanes"] for bar in lane["bars"]]
    assert sorted((b["mini_batch"], b["state"]) for b in bars) == [(f"mb-0000{i}", "succeeded") for i in range(4)]
    assert sum(b["rows"] for b in bars) == 150
    assert (report["failures"], report["summary"]["status"], report["summary"]["rows"]) == ([], "succeeded", 150)
    assert report["summary"]["output"] == f"{folder}/predictions.csv"
    # The records: their URIs (the plugin does not stream objects), each an object the run wrote.
    assert report["links"] == {
        key: {"name": name, "href": None, "location": f"{folder}/{name}"}
        for key, name in (
            ("summary", "summary.json"),
            ("ledger", "processed_mini-batches.csv"),
            ("errors", "errors.csv"),
            ("output", "predictions.csv"),
        )
    }
    for link in report["links"].values():
        assert read_object(link["location"]), link
    assert read_object(f"{folder}/predictions.csv").count(b"\n") == 151  # a header and every row
