"""Input files of the serving contract cut into records, and records packed into request payloads.

SageMaker batch transform's ``SplitType`` decides what a record is:

- ``None``: the whole file is one record (one request).
- ``Line``: a line, without its ``\\n`` (and a trailing ``\\r``); blank lines are skipped. A
  record is sent followed by ``\\n``.
- ``RecordIO``: one MXNet RecordIO record, sent with its framing, so any payload is itself a
  valid RecordIO stream. A record written in several parts stays one record.
- ``TFRecord``: one TFRecord, sent with its framing (length, CRCs, data).

``BatchStrategy`` decides how records become payloads: one record per request
(``SINGLE_RECORD``), or as many consecutive records of one file as fit in ``MaxPayloadInMB``
(``MULTI_RECORD``). Payloads never mix files. Standard library only.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass

from batchscore_runtime.formats import ItemError

SPLIT_TYPES = ("None", "Line", "RecordIO", "TFRecord")
BATCH_STRATEGIES = ("MULTI_RECORD", "SINGLE_RECORD")
COMPRESSIONS = ("None", "Gzip")

RECORDIO_MAGIC = 0xCED7230A
_RECORDIO_LENGTH_MASK = (1 << 29) - 1
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class FileError(Exception):
    """A problem that fails one input file (and only it): becomes that file's :class:`ItemError`."""

    def __init__(self, type: str, message: str, record: int | None = None):
        super().__init__(message)
        self.type = type
        self.message = message
        self.record = record

    def item_error(self, file: str) -> ItemError:
        return ItemError(file=file, type=self.type, message=self.message, record=self.record)


def corrupt(message: str, record: int | None = None) -> FileError:
    return FileError("CorruptInput", message, record)


# --------------------------------------------------------------------------- reading


def decompress(data: bytes, compression: str) -> bytes:
    """The file's bytes as the container should see them (``CompressionType``)."""
    if compression == "None":
        return data
    if compression != "Gzip":
        raise ValueError(f"CompressionType must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise corrupt(f"not a gzip file: {exc}") from None


def split_records(data: bytes, split_type: str) -> list[bytes]:
    """The records of one (decompressed) file, in order; raises :class:`FileError` for a corrupt file."""
    if split_type == "None":
        return [data]
    if split_type == "Line":
        return split_lines(data)
    if split_type == "RecordIO":
        return split_recordio(data)
    if split_type == "TFRecord":
        return split_tfrecord(data)
    raise ValueError(f"SplitType must be one of {', '.join(SPLIT_TYPES)}, got {split_type!r}")


def split_lines(data: bytes) -> list[bytes]:
    """Lines without ``\\n`` and a trailing ``\\r``; blank lines are skipped."""
    records = []
    for line in data.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.strip():
            records.append(line)
    return records


def split_recordio(data: bytes) -> list[bytes]:
    """MXNet RecordIO records, each with its framing; the parts of a multi-part record stay together.

    Framing of one part: uint32 LE magic ``0xced7230a``, uint32 LE ``lrecord`` (lower 29 bits:
    the data length; upper 3 bits ``cflag``: 0 whole record, 1 first part, 2 middle part, 3
    last part), the data, zero padding to a multiple of 4 bytes.
    """
    records: list[bytes] = []
    pos, start, open_part = 0, 0, False
    while pos < len(data):
        record = len(records) + 1
        if len(data) - pos < 8:
            raise corrupt(
                f"truncated RecordIO record {record} at byte {pos}: {len(data) - pos} bytes left, a header needs 8", record
            )
        magic, lrecord = _U32.unpack_from(data, pos)[0], _U32.unpack_from(data, pos + 4)[0]
        if magic != RECORDIO_MAGIC:
            raise corrupt(f"bad RecordIO magic 0x{magic:08x} at byte {pos} (expected 0x{RECORDIO_MAGIC:08x})", record)
        cflag, length = lrecord >> 29, lrecord & _RECORDIO_LENGTH_MASK
        end = pos + 8 + length + (-length % 4)
        if end > len(data):
            raise corrupt(
                f"truncated RecordIO record {record} at byte {pos}: its header says {length} bytes of data, "
                f"{len(data) - pos - 8} remain",
                record,
            )
        if cflag > 3:
            raise corrupt(f"bad RecordIO cflag {cflag} at byte {pos} (0 to 3 are defined)", record)
        if open_part and cflag in (0, 1):
            raise corrupt(
                f"truncated RecordIO record {record} at byte {start}: its last part is missing "
                f"(a new record starts at byte {pos})",
                record,
            )
        if not open_part and cflag in (2, 3):
            raise corrupt(f"RecordIO part at byte {pos} (cflag {cflag}) continues a record that never started", record)
        if not open_part:
            start = pos
        open_part = cflag in (1, 2)
        pos = end
        if not open_part:
            records.append(data[start:pos])
    if open_part:
        record = len(records) + 1
        raise corrupt(f"truncated RecordIO record {record} at byte {start}: its last part is missing", record)
    return records


def split_tfrecord(data: bytes) -> list[bytes]:
    """TFRecords, each with its framing: uint64 LE length, masked CRC32C of the length, data, masked CRC32C of the data.

    The length's CRC is checked, so a file that is not TFRecord, or is cut, fails at the
    offset where it goes wrong. The data's CRC is not checked: pure-Python CRC32C runs at a
    few MB/s, slower than the scoring itself; the container reading the payload may check it.
    """
    records: list[bytes] = []
    pos = 0
    while pos < len(data):
        record = len(records) + 1
        if len(data) - pos < 12:
            raise corrupt(f"truncated TFRecord {record} at byte {pos}: {len(data) - pos} bytes left, a header needs 12", record)
        header = data[pos : pos + 8]
        (length,) = _U64.unpack(header)
        (length_crc,) = _U32.unpack_from(data, pos + 8)
        if length_crc != masked_crc32c(header):
            raise corrupt(
                f"TFRecord {record} at byte {pos}: the length's CRC does not match (not a TFRecord file, or corrupt)", record
            )
        end = pos + 12 + length + 4
        if end > len(data):
            raise corrupt(
                f"truncated TFRecord {record} at byte {pos}: its header says {length} bytes of data and a 4-byte CRC, "
                f"{len(data) - pos - 12} remain",
                record,
            )
        records.append(data[pos:end])
        pos = end
    return records


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C: rotated right by 15 bits, plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --------------------------------------------------------------------------- payloads


@dataclass(frozen=True)
class Payload:
    """The body of one ``/invocations`` request: ``count`` records of one file from record ``first`` (1-based)."""

    first: int
    count: int
    body: bytes

    @property
    def label(self) -> str:
        """``record 5`` or ``records 5-9``: how messages name the payload's records."""
        return f"record {self.first}" if self.count == 1 else f"records {self.first}-{self.first + self.count - 1}"


def pack_payloads(records: list[bytes], split_type: str, batch_strategy: str, max_payload_mb: int) -> list[Payload]:
    """The payloads of one file's records; raises a ``RecordTooLarge`` :class:`FileError` for a record over the cap.

    A record's size is the bytes it adds to a payload (a line's ``\\n`` included).
    """
    if batch_strategy not in BATCH_STRATEGIES:
        raise ValueError(f"BatchStrategy must be one of {', '.join(BATCH_STRATEGIES)}, got {batch_strategy!r}")
    limit = max_payload_mb * 1024 * 1024
    end = b"\n" if split_type == "Line" else b""
    cap = f"MaxPayloadInMB = {max_payload_mb} ({limit:,} bytes)"
    payloads: list[Payload] = []
    parts: list[bytes] = []
    size, first = 0, 1
    for number, record in enumerate(records, start=1):
        length = len(record) + len(end)
        if length > limit:
            if split_type == "None":
                message = f"the file is {length:,} bytes, over {cap}; with SplitType None the whole file is one request"
            else:
                message = f"record {number} is {length:,} bytes, over {cap}"
            raise FileError("RecordTooLarge", message, number)
        if parts and (batch_strategy == "SINGLE_RECORD" or size + length > limit):
            payloads.append(Payload(first, len(parts), b"".join(parts)))
            parts, size, first = [], 0, number
        parts.append(record + end if end else record)
        size += length
    if parts:
        payloads.append(Payload(first, len(parts), b"".join(parts)))
    return payloads
