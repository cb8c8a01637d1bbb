"""``python -m batchscore demo-s3`` (``make demo-s3``): the iris example with its model, inputs and output on S3.

What :func:`s3_demo` sets up, under the demo's home (``.airflow-s3/``), before ``python -m batchscore run``
runs the example on a local Airflow (api-server, scheduler, dag-processor, triggerer) as ``make demo`` does:

* a local S3 server, SeaweedFS's ``weed mini`` (:class:`batchscore.localservices.SeaweedS3`, data in
  ``s3/``, emptied at each start), and a bucket, :data:`BUCKET`;
* the example's model folder and input files uploaded to ``s3://<bucket>/models/<name>/`` and
  ``s3://<bucket>/data/<name>/``;
* a copy of the deployment YAML (``dags/deployments/iris-batch.yaml``) in ``deployments/``, with
  ``model.path``, ``input.path`` and ``output.path`` on that bucket, each naming the Airflow connection
  :data:`CONNECTION`, and the scoring code's folder as an absolute path;
* in this process's environment, which the Airflow components inherit: ``AIRFLOW_CONN_BATCHSCORE_S3``
  (the server's endpoint and keys: the only place they are), ``BATCHSCORE_DEPLOYMENTS_DIR`` (the DAG file
  reads the YAML from there) and ``BATCHSCORE_SCRATCH_DIR`` (``scratch/``, unless already set).

Leaving the block (a return, an error, Ctrl-C, SIGTERM or SIGHUP: :mod:`batchscore.shutdown`) restores the
environment and stops the S3 server; a signal's one-line report names it (``stopped SeaweedFS``).
:meth:`S3Demo.describe_output` lists what the run wrote to the bucket; with ``--keep`` the server stays up
until a signal, and ``s3.env`` (mode 0600) holds what the AWS CLI or boto3 need to look at it; that signal is
the expected end, so the exit status is then the run's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from batchscore import shutdown
from batchscore.localservices import SeaweedS3

#: The demo's bucket on its own S3 server.
BUCKET = "batchscore-demo"
#: The Airflow connection the demo's YAML names; its URI-free JSON form is in ``AIRFLOW_CONN_BATCHSCORE_S3``.
CONNECTION = "batchscore_s3"
CONNECTION_ENV = f"AIRFLOW_CONN_{CONNECTION.upper()}"


@dataclass
class DemoPlan:
    """The S3 layout of one deployment YAML: what is uploaded from where, and the rewritten YAML."""

    doc: dict[str, Any]  #: the deployment YAML with its paths on S3
    uploads: list[tuple[Path, str]]  #: (local folder, key prefix in the bucket), in upload order
    output_uri: str  #: ``output.path``: where runs write, ``s3://<bucket>/output/<endpoint>/``


def _local(base: Path, value: str) -> Path:
    """A YAML path as the deployment loader reads it: relative to the YAML's folder."""
    path = Path(value).expanduser()
    return (path if path.is_absolute() else base / path).resolve()


def plan_demo(source: Path, *, name: str = "iris", bucket: str = BUCKET, connection: str = CONNECTION) -> DemoPlan:
    """Read the deployment YAML ``source`` and lay it out on ``s3://bucket``.

    ``model.path`` becomes ``s3://bucket/models/<name>/``, ``input.path`` ``s3://bucket/data/<name>/`` and
    ``output.path`` ``s3://bucket/output/<endpoint name>/``, each with ``connection: <connection>``; the code
    folder becomes absolute (the copy lives in another folder).

    :param source: a deployment YAML whose model and input are local folders (the iris example's).
    :param name: the example's name in the model and data prefixes.
    :param bucket: the bucket that will hold everything.
    :param connection: the Airflow connection id the YAML names.
    """
    doc = yaml.safe_load(source.read_text(encoding="utf-8"))
    base = source.parent
    endpoint = doc["endpoint_name"]
    uploads = []
    for key, prefix in (("model", f"models/{name}/"), ("input", f"data/{name}/")):
        folder = _local(base, doc[key]["path"])
        if not folder.is_dir() or not any(p.is_file() for p in folder.rglob("*")):
            raise SystemExit(
                f"{source}: {key}.path is {folder}, which has no files; prepare the example first with `make example`"
            )
        uploads.append((folder, prefix))
        doc[key] = {**doc[key], "path": f"s3://{bucket}/{prefix}", "connection": connection}
    output_uri = f"s3://{bucket}/output/{endpoint}/"
    doc["output"] = {**doc.get("output", {}), "path": output_uri, "connection": connection}
    code = doc.get("code_configuration", {})
    if code.get("code"):
        code["code"] = str(_local(base, code["code"]))
    return DemoPlan(doc=doc, uploads=uploads, output_uri=output_uri)


def upload_folder(client: Any, folder: Path, bucket: str, prefix: str) -> int:
    """Upload every file under ``folder`` (recursively, in name order) to ``s3://bucket/<prefix><relative path>``.

    :param client: a boto3 S3 client (:meth:`SeaweedS3.client`).
    :returns: the number of files uploaded.
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        client.upload_file(str(path), bucket, prefix + path.relative_to(folder).as_posix())
    return len(files)


def list_keys(client: Any, bucket: str, prefix: str) -> list[tuple[str, int]]:
    """Every object under ``s3://bucket/prefix``: (key, size), in key order."""
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found += [(o["Key"], int(o["Size"])) for o in page.get("Contents", [])]
    return sorted(found)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block; put back what was there before."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class S3Demo:
    """What :func:`s3_demo` started and wrote."""

    server: SeaweedS3
    plan: DemoPlan
    home: Path
    deployment_file: Path
    bucket: str = BUCKET

    @property
    def env_file(self) -> Path:
        """``s3.env``: the server's endpoint and keys for the AWS CLI or boto3 (written by :meth:`write_env_file`)."""
        return self.home / "s3.env"

    def describe_output(self) -> str:
        """The output URI, the objects a run wrote there (its work files under ``_batchscore/`` counted, not listed),
        and how to look at them."""
        prefix = self.plan.output_uri.removeprefix(f"s3://{self.bucket}/")
        keys = list_keys(self.server.client(), self.bucket, prefix)
        shown = [(k, size) for k, size in keys if "/_batchscore/" not in k]
        lines = [f"Output on S3: {self.plan.output_uri}"]
        width = max((len(k) for k, _ in shown), default=0) + len(f"s3://{self.bucket}/")
        lines += [f"  {f's3://{self.bucket}/{k}':<{width}}  {size:>9,} bytes" for k, size in shown]
        if work := len(keys) - len(shown):
            lines.append(f"  (and {work} work file(s) of the run under _batchscore/: its plan, statuses, results)")
        if not keys:
            lines.append("  (nothing: the run wrote no object there)")
        return "\n".join(lines)

    def write_env_file(self) -> Path:
        """Write :attr:`env_file` (mode 0600): ``AWS_ENDPOINT_URL``, the keys and the region of the demo's server."""
        key, secret = self.server.credentials()
        self.env_file.touch(mode=0o600)
        self.env_file.chmod(0o600)
        self.env_file.write_text(
            "# The demo's S3 server (python -m batchscore demo-s3 --keep); valid while it runs.\n"
            f"AWS_ENDPOINT_URL={self.server.endpoint_url}\nAWS_ACCESS_KEY_ID={key}\n"
            f"AWS_SECRET_ACCESS_KEY={secret}\nAWS_DEFAULT_REGION={self.server.region}\n",
            encoding="utf-8",
        )
        return self.env_file

    def how_to_list(self) -> str:
        """The commands that list the output while the server runs (after :meth:`write_env_file`)."""
        uri = self.plan.output_uri
        env = self.env_file
        return (
            f"The S3 server stays up until Ctrl-C; {env} holds its endpoint and keys. List the output with\n"
            f"  set -a; . {env}; set +a; aws s3 ls --recursive {uri}\n"
            "or, without the AWS CLI,\n"
            f"  set -a; . {env}; set +a; {sys.executable} -c "
            f"\"import boto3; [print(o['Key'], o['Size']) for o in boto3.client('s3').list_objects_v2("
            f"Bucket='{self.bucket}', Prefix='{uri.removeprefix(f's3://{self.bucket}/')}')['Contents']]\""
        )

    def wait(self) -> None:
        """Keep the server up until a signal (Ctrl-C, SIGTERM, SIGHUP) or until it exits."""
        proc = self.server.proc
        with contextlib.suppress(shutdown.Interrupted):
            while proc is not None and proc.poll() is None:
                shutdown.wait_unless_forced(1.0)
        if shutdown.interrupted():
            shutdown.say(f"{shutdown.signal_name()}: stopping the S3 server")


def _fresh_server_root(root: Path) -> Path:
    """The S3 server's folder, emptied: a demo starts from its own uploads alone."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    return root


@contextlib.contextmanager
def s3_demo(home: Path, source: Path, *, say: Any = print) -> Iterator[S3Demo]:
    """Start the demo's S3 server, upload the example, write its YAML and set the environment; undo it all after.

    :param home: the demo's folder (``.airflow-s3``): ``s3/`` (the server's data and ``weed.log``),
        ``deployments/`` (the YAML), ``scratch/``; the caller puts Airflow's home beside them.
    :param source: the deployment YAML to copy (``dags/deployments/iris-batch.yaml``).
    :param say: where progress lines go.
    """
    home = home.resolve()
    plan = plan_demo(source)
    say(f"Starting a local S3 server (SeaweedFS: weed mini) in {home / 's3'} ...")
    with SeaweedS3(_fresh_server_root(home / "s3")) as server:
        client = server.client()
        server.create_bucket(BUCKET)
        for folder, prefix in plan.uploads:
            count = upload_folder(client, folder, BUCKET, prefix)
            say(f"  uploaded {count} file(s) of {folder} to s3://{BUCKET}/{prefix}")
        deployments = home / "deployments"
        shutil.rmtree(deployments, ignore_errors=True)
        deployments.mkdir(parents=True)
        deployment_file = deployments / source.name
        header = f"# Written by python -m batchscore demo-s3 from {source}: model, input and output on S3.\n"
        deployment_file.write_text(header + yaml.safe_dump(plan.doc, sort_keys=False), encoding="utf-8")
        say(f"  deployment YAML: {deployment_file} (connection {CONNECTION!r}: {CONNECTION_ENV})")
        env = {
            CONNECTION_ENV: server.connection_json(),
            "BATCHSCORE_DEPLOYMENTS_DIR": str(deployments),
            "BATCHSCORE_SCRATCH_DIR": os.environ.get("BATCHSCORE_SCRATCH_DIR") or str(home / "scratch"),
        }
        demo = S3Demo(server=server, plan=plan, home=home, deployment_file=deployment_file)
        try:
            with _environment(env):
                yield demo
        finally:
            demo.env_file.unlink(missing_ok=True)  # its keys die with the server
