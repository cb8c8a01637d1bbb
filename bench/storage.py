"""Object storage (issue 17): staging throughput against a direct download of the same objects, and the same
job end to end with its data on local disk and on S3.

Both parts use a real S3 server, SeaweedFS's ``weed mini`` (:class:`batchscore.localservices.SeaweedS3`), on
this machine, so what is measured is the client side: requests, concurrency, checks and local writes.

**Staging.** Two sets of objects in one bucket: many small ones (200 x 256 KiB) and a few large ones
(8 x 16 MiB), random bytes. Each set is listed once with :func:`batchscore.storage.list_objects` (size and
version token, as the plan records them). Then, alternately and into fresh folders: the score task's
:func:`batchscore.staging.stage_files` (Airflow connection, version check, ``threads`` at once) against two
direct downloads of the same objects with the same credentials: s3fs's ``get()`` of every key at once (its
own async batching) and boto3's ``download_file`` from a pool of as many threads. After one untimed pass of
each on a few objects (sessions, connection pools), ``repeats`` rounds, the order rotated each round;
medians. The check: staging MB/s over the faster direct download's ``>= 0.8``.

**End to end.** Two deployments of one scoring script that reads each of its files and returns one line per
file, identical but for where their model, input and output are: a local folder, or a prefix of a bucket
(``connection:``, the server's keys in ``AIRFLOW_CONN_BENCH_S3``). Both run as two DAGs on one
:class:`~batchscore.localairflow.LocalAirflow` (api-server, scheduler, dag-processor, LocalExecutor). After
one untimed run of each, ``repeats`` rounds, the second in reverse order, each run timed with the API's
timestamps (trigger to end state); medians. Each run's summary must count every file. The check:
``t_job(s3) <= 1.3 * t_job(local)``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from batchscore.localairflow import LocalAirflow
from batchscore.localservices import SeaweedS3
from batchscore_runtime.formats import InputFile, Summary, run_key
from bench.common import Result, deployment_doc, job_folders, median, remove_containers, require_image, stopwatch, temp_folder
from bench.runs import timed_run

NAME = "storage"
TITLE = "object storage: staging against a direct s3fs/boto3 download; the same job on local disk and on S3"
STAGE_TARGET = 0.8
JOB_TARGET = 1.3
BUCKET = "bench-storage"
CONNECTION = "bench_s3"
LOCAL_DAG = "bench-storage-local"
S3_DAG = "bench-storage-s3"
KIB = 1024
MIB = 1024 * KIB
#: ``--small``: tiny sets, one round, and no end-to-end part (it needs the scoring image and a scheduler).
SMALL = {"small": (8, 64 * KIB), "large": (2, 1 * MIB), "repeats": 1, "job_files": 0}

#: The job's scoring script: reads each file whole, one line per file (name and bytes read).
READ_SCRIPT = """import os


def init():
    pass


def run(mini_batch):
    out = []
    for path in mini_batch:
        with open(path, "rb") as f:
            out.append(f"{os.path.basename(path)} {len(f.read())}")
    return out
"""


# --------------------------------------------------------------------------- staging


def _fill(client: Any, prefix: str, count: int, size: int) -> None:
    """``count`` objects of ``size`` random bytes under ``prefix`` in :data:`BUCKET`, 8 uploads at once."""

    def one(i: int) -> None:
        client.put_object(Bucket=BUCKET, Key=f"{prefix}obj-{i:05d}.bin", Body=os.urandom(size))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))


def _planned(prefix: str) -> tuple[Any, list[InputFile]]:
    """The prefix's location (through the Airflow connection) and its objects as a plan records them."""
    from batchscore import storage

    source = storage.location(f"s3://{BUCKET}/{prefix}", CONNECTION)
    files = [InputFile(path=o.name, size=o.size, mtime_ns=0, version=o.version) for o in storage.list_objects(source)]
    return source, files


def _staged_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _downloaders(server: SeaweedS3, prefix: str, threads: int) -> dict[str, Callable[[list[InputFile], Path], None]]:
    """The subject and the two baselines, each ``(files, target folder) -> None``."""
    import s3fs  # type: ignore[import-untyped]  # the amazon provider's s3fs extra

    from batchscore.staging import stage_files

    source, _ = _planned(prefix)
    key, secret = server.credentials()
    fs = s3fs.S3FileSystem(
        key=key, secret=secret, endpoint_url=server.endpoint_url, client_kwargs={"region_name": server.region},
        skip_instance_cache=True,
    )  # fmt: skip
    client = server.client(max_pool_connections=8 * threads)  # download_file's own threads share it

    def stage(files: list[InputFile], target: Path) -> None:
        staged = stage_files(source, files, target, threads=threads)
        if refused := [f.label for f in staged if f.refused]:
            raise RuntimeError(f"stage_files refused {len(refused)} object(s) that did not change: {refused[:3]}")

    def s3fs_get(files: list[InputFile], target: Path) -> None:
        for f in files:
            (target / f.path).parent.mkdir(parents=True, exist_ok=True)
        fs.get([f"{BUCKET}/{prefix}{f.path}" for f in files], [str(target / f.path) for f in files])

    def boto3_threads(files: list[InputFile], target: Path) -> None:
        def one(f: InputFile) -> None:
            (target / f.path).parent.mkdir(parents=True, exist_ok=True)
            client.download_file(BUCKET, f"{prefix}{f.path}", str(target / f.path))

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, files))

    return {"stage_files": stage, "s3fs_get": s3fs_get, "boto3_threads": boto3_threads}


def _staging(result: Result, server: SeaweedS3, root: Path, label: str, count: int, size: int, repeats: int) -> None:
    """One set of objects: fill, list, then the subject and baselines alternately; figures and the check."""
    prefix = f"{label}/"
    _fill(server.client(), prefix, count, size)
    _, files = _planned(prefix)
    total = count * size
    if len(files) != count or sum(f.size for f in files) != total:
        raise RuntimeError(f"listed {len(files)} objects of {sum(f.size for f in files)} bytes under {prefix}, not {count}")
    threads = 8
    methods = _downloaders(server, prefix, threads)
    for name, method in methods.items():  # untimed: each opens its sessions and connection pools
        warm = root / f"{label}-{name}-warm"
        method(files[:threads], warm)
        shutil.rmtree(warm)
    times: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)
    for k in range(repeats):
        for name in order[k % len(order) :] + order[: k % len(order)]:  # each goes first once in three rounds
            target = root / f"{label}-{name}-{k}"
            with stopwatch() as t:
                methods[name](files, target)
            if (got := _staged_bytes(target)) != total:
                raise RuntimeError(f"{name} wrote {got} bytes of {total} into {target}")
            shutil.rmtree(target)
            times[name].append(t[0])
    what = f"{count} x {_size(size)}"
    rates = {name: total / median(samples) / 1e6 for name, samples in times.items()}
    result.figure(f"{label}_objects", count, "", f"{label}: objects of {_size(size)} ({total / 1e6:,.0f} MB)")
    result.figure(f"{label}_stage_mb_s", rates["stage_files"], "MB/s", f"{label}: stage_files, {threads} threads")
    result.figure(f"{label}_s3fs_mb_s", rates["s3fs_get"], "MB/s", f"{label}: baseline s3fs get() of every key")
    result.figure(
        f"{label}_boto3_mb_s", rates["boto3_threads"], "MB/s", f"{label}: baseline boto3 download_file, {threads} threads"
    )
    best = max(rates["s3fs_get"], rates["boto3_threads"])
    result.check(f"stage_files / fastest direct download, {what}", rates["stage_files"] / best, ">=", STAGE_TARGET)
    shown = "; ".join(f"{name} {[round(v, 3) for v in samples]}" for name, samples in times.items())
    result.notes.append(f"{label} samples (s): {shown}")


def _size(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


# --------------------------------------------------------------------------- end to end


def _stage_jobs(root: Path, server: SeaweedS3, files: int, file_size: int, mini_batch_size: int) -> tuple[Path, Path]:
    """The inputs, model and code on disk and in the bucket; one YAML per job; the DAG folder.

    Returns the DAG folder and the deployments folder.
    """
    inputs, model, code = (root / name for name in ("inputs", "model", "code"))
    for folder in (inputs, model, code):
        folder.mkdir()
    client = server.client()
    for i in range(files):
        path = inputs / f"item-{i:04d}.bin"
        path.write_bytes(os.urandom(file_size))
        client.upload_file(str(path), BUCKET, f"job/inputs/{path.name}")
    (model / "model.txt").write_text("an empty model: the script loads nothing\n")
    client.upload_file(str(model / "model.txt"), BUCKET, "job/model/model.txt")
    (code / "score.py").write_text(READ_SCRIPT)
    settings = {"mini_batch_size": mini_batch_size}
    docs = {}
    for dag_id in (LOCAL_DAG, S3_DAG):
        doc = deployment_doc(
            dag_id, model=model, code=code, inputs=inputs, output=root / "output", pattern="*.bin", settings=settings,
            resources={"instance_count": 2},
        )  # fmt: skip
        if dag_id == S3_DAG:
            doc["model"] = {"path": f"s3://{BUCKET}/job/model/", "connection": CONNECTION}
            doc["input"] = {"path": f"s3://{BUCKET}/job/inputs/", "pattern": "*.bin", "connection": CONNECTION}
            doc["output"] = {"path": f"s3://{BUCKET}/job/output/", "connection": CONNECTION}
        docs[dag_id] = doc
    return job_folders(root, docs)


def _summary(server: SeaweedS3, root: Path, dag_id: str, run_id: str) -> Summary:
    """The run's ``summary.json``: from the local output folder, or fetched from the bucket."""
    local = root / "output" / run_key(run_id) / "summary.json"
    if dag_id == S3_DAG:
        local = root / "summaries" / f"{run_key(run_id)}.json"
        local.parent.mkdir(exist_ok=True)
        server.client().download_file(BUCKET, f"job/output/{run_key(run_id)}/summary.json", str(local))
    summary = Summary.read(local)
    if summary is None:
        raise RuntimeError(f"run {run_id} of {dag_id} wrote no summary.json")
    return summary


def _job_run(airflow: LocalAirflow, server: SeaweedS3, root: Path, dag_id: str, files: int) -> tuple[float, dict]:
    """One run, timed with the API's timestamps (:func:`bench.runs.timed_run`); its summary must count every file.
    Returns the seconds and the durations of its task instances, by task."""
    run = timed_run(airflow, dag_id)
    summary = _summary(server, root, dag_id, run.run_id)
    if summary.status != Summary.SUCCEEDED or summary.items.succeeded != files:
        raise RuntimeError(f"run {run.run_id} of {dag_id}: summary {summary.status}, {summary.items.succeeded} of {files} files")
    return run.seconds, run.durations


def _end_to_end(result: Result, server: SeaweedS3, root: Path, files: int, file_size: int, mini_batch_size: int,
                repeats: int) -> None:  # fmt: skip
    """Both jobs on one Airflow stack: one untimed run each, then ``repeats`` rounds; figures and the check."""
    dags, deployments = _stage_jobs(root, server, files, file_size, mini_batch_size)
    env = {
        f"AIRFLOW_CONN_{CONNECTION.upper()}": server.connection_json(),
        "BATCHSCORE_DEPLOYMENTS_DIR": str(deployments),
        "BATCHSCORE_SCRATCH_DIR": str(root / "scratch"),
    }
    samples: dict[str, list[float]] = {LOCAL_DAG: [], S3_DAG: []}
    tasks: dict[str, dict[str, list[float]]] = {LOCAL_DAG: {}, S3_DAG: {}}
    try:
        with LocalAirflow(root / "airflow", dags, env=env) as airflow:
            for dag_id in samples:
                airflow.wait_for_dag(dag_id)
            for dag_id in samples:
                _job_run(airflow, server, root, dag_id, files)
            order = list(samples)
            for k in range(repeats):
                for dag_id in order if k % 2 == 0 else order[::-1]:
                    seconds, durations = _job_run(airflow, server, root, dag_id, files)
                    samples[dag_id].append(seconds)
                    for task, values in durations.items():
                        tasks[dag_id].setdefault(task, []).extend(values)
    finally:
        for dag_id in samples:
            remove_containers(f"batchscore.endpoint={dag_id}")
    t_local, t_s3 = median(samples[LOCAL_DAG]), median(samples[S3_DAG])
    mini_batches = -(-files // mini_batch_size)
    result.figure("job_files", files, "", f"job: files of {_size(file_size)}, {mini_batches} mini-batches, 2 at a time")
    result.figure("t_job_local", t_local, "s", "job on local disk, trigger -> success")
    result.figure("t_job_s3", t_s3, "s", "job on S3 (model, input, output), trigger -> success")
    for task in ("plan", "score", "merge"):
        for dag_id, where in ((LOCAL_DAG, "local"), (S3_DAG, "s3")):
            if task in tasks[dag_id]:
                result.figure(
                    f"{task}_task_{where}_s", median(tasks[dag_id][task]), "s", f"{task} task instance, median, {where}"
                )
    result.figure("s3_extra_per_mini_batch", (t_s3 - t_local) / mini_batches, "s", "(t_job_s3 - t_job_local) per mini-batch")
    result.check("t_job_s3 / t_job_local", t_s3 / t_local, "<=", JOB_TARGET)
    shown = "; ".join(f"{dag_id} {[round(v, 2) for v in values]}" for dag_id, values in samples.items())
    result.notes.append(f"job samples (s): {shown}")


# --------------------------------------------------------------------------- the benchmark


def run(
    small: tuple[int, int] = (200, 256 * KIB),
    large: tuple[int, int] = (8, 16 * MIB),
    repeats: int = 3,
    job_files: int = 40,
    job_file_size: int = 1 * MIB,
    mini_batch_size: int = 4,
) -> Result:
    """Staging of ``small`` and ``large`` (count, bytes) object sets, ``repeats`` rounds each; then, unless
    ``job_files`` is 0, the job of ``job_files`` files of ``job_file_size`` bytes on local disk and on S3."""
    if job_files:
        require_image()
    result = Result(NAME, TITLE)
    conn_env = f"AIRFLOW_CONN_{CONNECTION.upper()}"
    with temp_folder(NAME) as root, SeaweedS3(root / "s3") as server:
        before = os.environ.get(conn_env)
        os.environ[conn_env] = server.connection_json()  # for this process's storage.location()
        try:
            server.create_bucket(BUCKET)
            for label, (count, size) in (("small", small), ("large", large)):
                _staging(result, server, root, label, count, size, repeats)
            if job_files:
                _end_to_end(result, server, root, job_files, job_file_size, mini_batch_size, max(1, min(repeats, 2)))
        finally:
            if before is None:
                os.environ.pop(conn_env, None)
            else:
                os.environ[conn_env] = before
    return result
