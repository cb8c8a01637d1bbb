"""Where the UI finds a run's folder: the plan task records it in XCom, and it is read here or on object storage.

The deployment a run works on is the YAML's with the run's parameters applied (:mod:`batchscore.run_params`),
and its run folder may be a mirror on a worker host in front of object storage (:mod:`batchscore.run_store`):
the api-server could not work that out again without the YAML files. So the plan task, which knows, pushes
:func:`record` as the XCom :data:`XCOM_KEY`; the plugin reads it back with the run's other task data and
opens the folder with :func:`reader`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from batchscore import storage
from batchscore.errors import StorageNotFoundError
from batchscore.run_store import Placement
from batchscore.ui.report import FolderReader, local_reader
from batchscore_runtime.formats import SUMMARY_FILE_NAME

#: The plan task's XCom that names the run folder: ``{"folder": path or URI, "connection": id or None}``.
XCOM_KEY = "batchscore_run_folder"
#: Files of remote run folders kept in memory (statuses, keyed by their task instance's try).
_CACHE_ENTRIES = 20_000


def record(placement: Placement) -> dict[str, Any]:
    """What the plan task pushes as :data:`XCOM_KEY`: the run folder (a path, or a URI) and its connection."""
    folder = placement.summary_location().removesuffix("/" + SUMMARY_FILE_NAME)
    connection = placement.remote_run.conn_id if placement.remote_run is not None else None
    return {"folder": folder, "connection": connection}


class _Cache:
    """Bytes of files of remote run folders by (folder, path, stamp): a status is read once per try."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[tuple[str, str, Any], bytes | None] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple[str, str, Any]) -> tuple[bool, bytes | None]:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return True, self.items[key]
        return False, None

    def put(self, key: tuple[str, str, Any], value: bytes | None) -> None:
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)


_cache = _Cache(_CACHE_ENTRIES)


def reader(folder: str, connection: str | None = None) -> FolderReader:
    """A :data:`batchscore.ui.report.FolderReader` of the run folder ``folder`` (a path, or a URI on object storage)."""
    if not storage.is_remote(folder):
        return local_reader(local_folder(folder))
    root = storage.location(folder, connection)

    def read(rel: str, stamp: Any = None) -> bytes | None:
        key = (folder, rel, stamp)
        if stamp is not None:
            hit, value = _cache.get(key)
            if hit:
                return value
        try:
            data: bytes | None = storage.read_bytes(root / rel)
        except StorageNotFoundError:
            data = None
        if stamp is not None:
            _cache.put(key, data)
        return data

    return read


def local_folder(folder: str) -> Path:
    """The run folder on this host of a recorded path (or ``file://`` URI)."""
    return Path(storage.location(folder).path)


__all__ = ["XCOM_KEY", "local_folder", "reader", "record"]
