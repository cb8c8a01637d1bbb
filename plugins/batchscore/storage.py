"""The Airflow side's one door to data on object storage (``s3://``, ``gs://``, ``abfs://``, ``abfss://``) and
local disk (plain paths, ``file://``): locations, listings with version tokens, ranged reads, transfers.

Built on Airflow 3's :class:`~airflow.sdk.ObjectStoragePath` (fsspec underneath): the scheme picks the
filesystem a provider registers (``s3``/``s3a``: apache-airflow-providers-amazon with its ``s3fs`` extra,
in the lock; ``gs``/``gcs``: the Google provider; ``abfs``/``abfss``: the Microsoft Azure provider), and
the filesystem gets its credentials from the Airflow connection (``conn_id``) through the provider's
``get_fs`` (for S3, ``S3Hook``: login/password, ``extra.endpoint_url`` for S3-compatible servers). A URI's
user part names a connection too (``s3://my_conn@bucket/key``, Airflow's form). Without a connection the
provider's default applies (for S3: boto3's credential chain: environment, ``~/.aws``, instance role).

What this module adds to ``ObjectStoragePath``:

* A named connection must exist: the amazon provider would otherwise log a warning and go on with no
  credentials (:class:`~batchscore.errors.StorageConnectionError`).
* Narrow errors (:mod:`batchscore.errors`: ``StorageNotFoundError``, ``StorageAccessError``, ...) whose
  messages name the URI, masked by :func:`display`, and what to do; the connection's secrets are scrubbed
  from any server text they quote, and the original exception is not chained (its text is quoted).
* Fresh answers: Airflow caches one filesystem per scheme and connection for the process (and s3fs
  caches listings in it); every listing and stat here drops that cache for the path first.
* Writes that become visible whole: an object appears when its PUT or multipart upload completes; a local
  file is written under a temporary name in the same folder and renamed over the target.
* Version tokens (:attr:`ObjectInfo.version`) that change when an object changes: the GCS generation,
  else a version id (versioned buckets), else the ETag; ``mtime_ns:…:size:…`` for local files.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

from airflow.sdk import Connection, ObjectStoragePath
from airflow.sdk.exceptions import AirflowNotFoundException
from airflow.sdk.io.fs import has_fs

from batchscore.errors import (
    ObjectChangedError,
    StorageAccessError,
    StorageConnectionError,
    StorageError,
    StorageNotFoundError,
)

#: Schemes of object storage, and the provider that registers each (for the "install it" message).
REMOTE_SCHEMES = {
    "s3": "apache-airflow-providers-amazon[s3fs]",
    "s3a": "apache-airflow-providers-amazon[s3fs]",
    "gs": "apache-airflow-providers-google",
    "gcs": "apache-airflow-providers-google",
    "abfs": "apache-airflow-providers-microsoft-azure",
    "abfss": "apache-airflow-providers-microsoft-azure",
}
LOCAL_SCHEMES = ("", "file", "local")
_SUPPORTED = "s3://, gs://, abfs://, abfss://, file:// or a plain path"
_SECRET_EXTRA_KEY = re.compile(r"secret|token|password|passwd|key|credential|sas|signature", re.IGNORECASE)
_SCRUBBED = "***"
T = TypeVar("T")
_REPLAN = "rerun the job to plan it again"


@dataclass(frozen=True)
class ObjectInfo:
    """One object (or local file) as listed: enough for a plan to persist and to check later."""

    uri: str  #: where it is: ``s3://bucket/key`` (no connection in it), or an absolute local path
    name: str  #: its path relative to the listed prefix, ``/``-separated (its file name for a single object)
    size: int  #: bytes
    version: str  #: changes whenever the object changes (see :func:`version_token`)


def _scheme(uri: str) -> str:
    """The URI's scheme in lower case; ``""`` for a plain path."""
    if "://" not in uri:
        return ""
    return uri.split("://", 1)[0].lower()


def mask_uri(uri: str) -> str:
    """``uri`` without what could be a credential: a ``user:password@`` part and a query (a SAS token)
    become ``***``; a bare ``conn_id@`` (Airflow's way to name a connection) stays."""
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return f"{_scheme(uri)}://{_SCRUBBED}"
    userinfo, at, host = parts.netloc.rpartition("@")
    netloc = (f"{_SCRUBBED}@" if ":" in userinfo else f"{userinfo}@") + host if at else parts.netloc
    query = f"?{_SCRUBBED}" if parts.query else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}"


def is_remote(where: str | os.PathLike[str] | ObjectStoragePath) -> bool:
    """Whether ``where`` is on object storage (any scheme but ``file://``; a plain path is local)."""
    if isinstance(where, ObjectStoragePath):
        return (where.protocol or "") not in LOCAL_SCHEMES
    return _scheme(os.fspath(where)) not in LOCAL_SCHEMES


def location(where: str | os.PathLike[str] | ObjectStoragePath, connection: str | None = None) -> ObjectStoragePath:
    """The :class:`ObjectStoragePath` of a URI or local path.

    Plain paths (made absolute against the working folder) and ``file://`` URIs are local; ``connection``
    does not apply to them. ``s3://``, ``s3a://``, ``gs://``, ``gcs://``, ``abfs://`` and ``abfss://`` use
    the Airflow connection ``connection``, else the one named in the URI (``s3://conn_id@bucket/...``),
    else the provider's default credentials. Raises :class:`StorageConnectionError` when the connection
    does not exist or the scheme's provider is not installed, :class:`StorageError` for another scheme.
    """
    if isinstance(where, ObjectStoragePath):
        if connection is None or where.conn_id == connection or not is_remote(where):
            return where
        where = uri_of(where)
    text = os.fspath(where)
    scheme = _scheme(text)
    if scheme in LOCAL_SCHEMES:
        local = text.split("://", 1)[1] if scheme else text
        if scheme and local.startswith("localhost/"):
            local = local.removeprefix("localhost")
        return ObjectStoragePath(f"file://{Path(local).expanduser().absolute()}")
    if scheme not in REMOTE_SCHEMES:
        raise StorageError(f"{mask_uri(text)}: the scheme {scheme}:// is not supported; use {_SUPPORTED}")
    text = scheme + text[len(scheme) :]  # S3:// as s3://
    userinfo, _, host = urlsplit(text).netloc.rpartition("@")
    if userinfo and scheme.startswith("abfs") and "." in host:
        raise StorageError(
            f"{mask_uri(text)}: write {scheme}://{userinfo}/<path> (container, then path) and give the storage "
            "account in the Airflow connection: Airflow reads the part before @ as a connection id"
        )
    if ":" in userinfo:
        raise StorageError(
            f"{mask_uri(text)}: credentials do not belong in a URI; put them in an Airflow connection and "
            f"name it (`connection:` or {scheme}://<conn_id>@...)"
        )
    conn_id = connection or userinfo or None
    if conn_id is not None:
        _connection(conn_id, text)
    if not has_fs(scheme):
        raise StorageConnectionError(
            f"{mask_uri(text)}: no filesystem for {scheme}:// is installed; install {REMOTE_SCHEMES[scheme]} "
            f"(pip install '{REMOTE_SCHEMES[scheme]}') on every Airflow worker"
        )
    return ObjectStoragePath(text, conn_id=conn_id)


def _connection(conn_id: str, uri: str) -> Connection:
    """The Airflow connection ``conn_id``, which must exist."""
    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        raise StorageConnectionError(
            f"{mask_uri(uri)}: the Airflow connection {conn_id!r} does not exist; create it (UI: Admin > "
            f"Connections; `airflow connections add {conn_id} --conn-json ...`; or the environment variable "
            f"AIRFLOW_CONN_{conn_id.upper()}), or name an existing one"
        ) from None


def uri_of(path: ObjectStoragePath) -> str:
    """``path`` as a URI, ``<protocol>://<path>``, without its connection (a key, or a name in a message)."""
    return f"{path.protocol}://{path.path}"


def display(path: ObjectStoragePath) -> str:
    """``path`` for a message: its URI (no credential can be in it) and the connection it uses."""
    if not is_remote(path):
        return path.path
    where = uri_of(path)
    return f"{where} (connection {path.conn_id!r})" if path.conn_id else where


def _uri(path: ObjectStoragePath, fs_path: str) -> str:
    """The URI of an fsspec path of ``path``'s filesystem (``bucket/key``), or the local path itself."""
    return f"{path.protocol}://{fs_path}" if is_remote(path) else fs_path


def _secrets(path: ObjectStoragePath) -> list[str]:
    """The connection's values that must never appear in a message: password and secret-looking extras."""
    if path.conn_id is None:
        return []
    with contextlib.suppress(Exception):
        conn = Connection.get(path.conn_id)
        found = [conn.password] if conn.password else []
        extra = conn.extra_dejson if isinstance(conn.extra_dejson, dict) else {}
        found += [str(v) for k, v in extra.items() if _SECRET_EXTRA_KEY.search(k) and v and str(v).strip()]
        return sorted(set(found), key=len, reverse=True)
    return []


def _scrubbed(text: str, path: ObjectStoragePath) -> str:
    for secret in _secrets(path):
        text = text.replace(secret, _SCRUBBED)
    return text


def _detail(exc: BaseException) -> str:
    """The error's own words: the server's code and message for a botocore error, else its text."""
    cause = exc.__cause__ if getattr(exc, "__cause__", None) is not None else exc
    response = getattr(cause, "response", None)
    if isinstance(response, dict) and isinstance(response.get("Error"), dict):
        error = response["Error"]
        return f"{error.get('Code', '?')}: {error.get('Message', '')}".strip()
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


def _raise(exc: BaseException, path: ObjectStoragePath, action: str) -> NoReturn:
    """Raise the :class:`StorageError` for ``exc``, met while ``action`` (``"list"``, ``"read"``, ...) ``path``."""
    where = display(path)
    detail = _scrubbed(_detail(exc), path)
    remote = is_remote(path)
    conn = f"the Airflow connection {path.conn_id!r}" if path.conn_id else "the default credentials (no connection named)"
    if isinstance(exc, FileNotFoundError):
        if remote and "bucket" in detail.lower():
            raise StorageNotFoundError(
                f"cannot {action} {where}: the bucket {path.bucket!r} does not exist ({detail}); create it, or correct the URI"
            ) from None
        raise StorageNotFoundError(f"cannot {action} {where}: it does not exist ({detail}); correct the URI or path") from None
    if isinstance(exc, PermissionError) or type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        what = f"check {conn}: its credentials, and that they may {action} there" if remote else "check the file permissions"
        raise StorageAccessError(f"cannot {action} {where}: access denied ({detail}); {what}") from None
    if remote:
        raise StorageError(
            f"cannot {action} {where}: {detail}; check the endpoint of {conn} and the network, then retry"
        ) from None
    raise StorageError(f"cannot {action} {where}: {detail}") from None


@contextlib.contextmanager
def _translated(path: ObjectStoragePath, action: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except (OSError, ValueError) as exc:
        _raise(exc, path, action)
    except Exception as exc:  # botocore / aiohttp errors that s3fs passes on untranslated
        if type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "azure"):
            _raise(exc, path, action)
        raise


def _fresh(path: ObjectStoragePath) -> Any:
    """``path``'s filesystem, with what it cached of ``path`` dropped (listings of other writers)."""
    fs = path.fs
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path.path)
    return fs


def version_token(path: ObjectStoragePath, info: dict[str, Any]) -> str:
    """A string that changes whenever the object changes, from an fsspec ``info()``/``find(detail=True)`` entry."""
    if not is_remote(path):
        st = os.stat(info["name"])
        return f"mtime_ns:{st.st_mtime_ns}:size:{st.st_size}"
    for key, kind in (("generation", "generation"), ("VersionId", "version"), ("version_id", "version"),
                      ("ETag", "etag"), ("etag", "etag")):  # fmt: skip
        value = info.get(key)
        if value not in (None, "", "null"):
            return f"{kind}:{str(value).strip(chr(34))}"
    raise StorageError(f"{display(path)}: the store gives no version token (ETag, generation or version id)")


def _info(path: ObjectStoragePath, fs_path: str, info: dict[str, Any]) -> tuple[str, int, str]:
    return _uri(path, fs_path), int(info.get("size") or 0), version_token(path, {**info, "name": fs_path})


def list_objects(prefix: ObjectStoragePath) -> list[ObjectInfo]:
    """Every object under ``prefix`` (recursively; ``prefix`` itself when it is one object), sorted by name.

    On object storage a prefix with no object is an empty list (there are no folders); a missing bucket,
    or a local folder that does not exist, raises :class:`StorageNotFoundError`.
    """
    with _translated(prefix, "list"):
        fs = _fresh(prefix)
        if not is_remote(prefix) and not os.path.exists(prefix.path):
            raise FileNotFoundError(prefix.path)
        found = fs.find(prefix.path, detail=True)
        base = prefix.path.rstrip("/")
        out = []
        for fs_path, info in found.items():
            if info.get("type", "file") != "file" or fs_path.endswith("/"):
                continue  # a "folder/" marker object
            name = fs_path[len(base) + 1 :] if fs_path.startswith(base + "/") else PurePosixPath(fs_path).name
            uri, size, version = _info(prefix, fs_path, info)
            out.append(ObjectInfo(uri=uri, name=name, size=size, version=version))
        return sorted(out, key=lambda o: o.name)


def object_info(path: ObjectStoragePath) -> ObjectInfo:
    """One object's size and version token, asked of the store now; :class:`StorageNotFoundError` if missing."""
    with _translated(path, "read"):
        info = _fresh(path).info(path.path)
        if info.get("type", "file") != "file":
            raise IsADirectoryError(f"{path.path} is a folder, not an object")
        uri, size, version = _info(path, path.path, info)
        return ObjectInfo(uri=uri, name=PurePosixPath(path.path).name, size=size, version=version)


def check_version(path: ObjectStoragePath, expect_version: str | None) -> None:
    if expect_version is None:
        return
    try:
        now = object_info(path).version
    except StorageNotFoundError:
        raise ObjectChangedError(f"{display(path)} was deleted after it was planned; rerun the job to plan it again") from None
    if now != expect_version:
        raise ObjectChangedError(
            f"{display(path)} changed after it was planned (version {expect_version}, now {now}); rerun the job to plan it again"
        )


def read_range(path: ObjectStoragePath, start: int, length: int, expect_version: str | None = None) -> bytes:
    """``length`` bytes of an object from ``start`` (fewer at its end, ``b""`` past it): a ranged GET, never the
    whole object. ``expect_version``: fail with :class:`ObjectChangedError` unless the object still has it."""
    if start < 0 or length < 0:
        raise ValueError(f"read_range needs start >= 0 and length >= 0, not {start} and {length}")
    check_version(path, expect_version)
    if length == 0:
        return b""
    with _translated(path, "read"):
        try:
            return bytes(path.fs.cat_file(path.path, start=start, end=start + length))
        except OSError as exc:
            if "range is not satisfiable" in str(exc).lower() or "InvalidRange" in _detail(exc):
                return b""  # starts past the end, as a file's read() there
            raise


def read_bytes(path: ObjectStoragePath, expect_version: str | None = None) -> bytes:
    """A whole (small) object: a status or a plan, not data."""
    check_version(path, expect_version)
    with _translated(path, "read"):
        return bytes(path.fs.cat_file(path.path))


def _temporary_beside(target: Path) -> Path:
    """A name in ``target``'s folder for a file that becomes ``target`` by a rename."""
    return target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")


@contextlib.contextmanager
def _replacing(target: Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` at once, else it is removed.
    ``durable``: flushed to disk first (a record); a disposable copy (staged input) is not."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_beside(target)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


async def _s3_get_if(fs: Any, fs_path: str, target: str, expect_version: str) -> None:
    """One GET of an S3 object that succeeds only for the expected version: ``If-Match`` on the ETag, or the
    version id itself (a versioned bucket); S3 answers 412 (``PreconditionFailed``) when the ETag differs."""
    bucket, key, _ = fs.split_path(fs_path)
    kind, _, value = expect_version.partition(":")
    condition = {"IfMatch": f'"{value}"'} if kind == "etag" else {"VersionId": value}
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, **condition)
    body = resp["Body"]
    try:
        with open(target, "wb") as out:
            while chunk := await body.read(1 << 20):
                out.write(chunk)
    finally:
        body.close()


def _conditional_get(path: ObjectStoragePath, target: Path, expect_version: str) -> bool:
    """Download ``path`` only if it still has ``expect_version``, in one request where the store allows it (S3);
    False when it cannot (another store, another kind of token): the caller checks the version itself."""
    if (path.protocol or "") not in ("s3", "s3a") or not expect_version.startswith(("etag:", "version:")):
        return False
    from fsspec.asyn import sync

    fs = path.fs
    try:
        sync(fs.loop, _s3_get_if, fs, path.path, str(target), expect_version)
    except Exception as exc:  # s3fs turns a 412 into an OSError; the botocore error is its cause
        if "PreconditionFailed" in _detail(exc) or "precondition" in str(exc).lower():
            raise ObjectChangedError(
                f"{display(path)} changed after it was planned (version {expect_version}, now another); {_REPLAN}"
            ) from None
        if isinstance(exc, FileNotFoundError):
            raise ObjectChangedError(f"{display(path)} was deleted after it was planned; {_REPLAN}") from None
        raise
    return True


def download(path: ObjectStoragePath, target: Path, expect_version: str | None = None, *, durable: bool = True) -> Path:
    """Copy an object to the local file ``target`` (its folder is made), which appears whole or not at all.

    ``expect_version``: fail with :class:`ObjectChangedError` unless the object still has that version once
    its bytes are here, or when it is gone: on S3 one conditional GET (``If-Match``, or the version id); on
    another store a check after the transfer, so a change during it is caught too. ``durable``: flush the
    copy to disk before it appears (not for a disposable copy, such as a staged input).
    """
    target = Path(target)
    with _replacing(target, durable) as tmp:
        try:
            with _translated(path, "download"):
                if expect_version is not None and _conditional_get(path, tmp, expect_version):
                    return_checked = True
                elif is_remote(path):
                    path.fs.get_file(path.path, str(tmp))
                    return_checked = False
                else:
                    shutil.copyfile(path.path, tmp)
                    return_checked = False
        except StorageNotFoundError:
            if expect_version is None:
                raise
            raise ObjectChangedError(f"{display(path)} was deleted after it was planned; {_REPLAN}") from None
        if not return_checked:
            check_version(path, expect_version)
    return target


def delete(path: ObjectStoragePath) -> None:
    """Remove one object (or local file); nothing to do when it is not there."""
    with _translated(path, "delete"):
        try:
            if is_remote(path):
                path.fs.rm_file(path.path)
            else:
                os.unlink(path.path)
        except FileNotFoundError:
            pass


def exists(path: ObjectStoragePath) -> bool:
    """Whether one object (or local file) is there now."""
    try:
        object_info(path)
    except StorageNotFoundError:
        return False
    return True


#: Transfers that fail for another reason than a missing object, a denied access or a changed version
#: (a dropped connection, a 5xx, a timeout) are tried again this many times, after these pauses.
RETRY_PAUSES = (0.5, 2.0, 5.0)


def retrying(action: Callable[[], T], what: str, log: Any = None) -> T:
    """``action()``, tried again after :data:`RETRY_PAUSES` when it raises a plain :class:`StorageError`
    (a network failure); the last error is raised. ``what`` names the transfer in the log."""
    for pause in (*RETRY_PAUSES, None):
        try:
            return action()
        except (StorageNotFoundError, StorageAccessError, StorageConnectionError, ObjectChangedError):
            raise
        except StorageError as exc:
            if pause is None:
                raise
            if log is not None:
                log.warning("%s failed (%s); trying again in %.1f s", what, exc, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def upload(source: Path, path: ObjectStoragePath) -> None:
    """Copy the local file ``source`` to ``path``: an object appears when its upload completes (multipart for
    large files), a local file by a rename; a failed upload leaves the previous content or none."""
    source = Path(source)
    if not source.is_file():
        raise StorageNotFoundError(f"cannot upload {source}: it is not a file")
    with _translated(path, "write"):
        if is_remote(path):
            path.fs.put_file(str(source), path.path)
        else:
            with _replacing(Path(path.path)) as tmp:
                shutil.copyfile(source, tmp)


def write_bytes(path: ObjectStoragePath, data: bytes) -> None:
    """Write a whole object (a status, a summary) that readers see complete or not at all."""
    with _translated(path, "write"):
        if is_remote(path):
            path.fs.pipe_file(path.path, bytes(data))
        else:
            with _replacing(Path(path.path)) as tmp:
                tmp.write_bytes(data)


def create(path: ObjectStoragePath, data: bytes) -> bool:
    """Write a whole object (or local file) unless one is there already: True when this call made it, False when
    another writer had (its content is kept, never replaced). Two writers racing: exactly one gets True.

    On object storage an exclusive create (fsspec's ``mode="create"``: on S3 a PUT with ``If-None-Match: *``,
    which the store refuses with 412 when the key exists); a local file is written under a temporary name and
    linked into place (a link fails when the name exists), so it appears whole or not at all.
    """
    with _translated(path, "write"):
        if is_remote(path):
            try:
                path.fs.pipe_file(path.path, bytes(data), mode="create")
            except FileExistsError:
                return False
            except OSError as exc:  # s3fs turns the 412 into an OSError; the botocore error is its cause
                if "PreconditionFailed" in _detail(exc):
                    return False
                raise
            return True
        target = Path(path.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary_beside(target)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
