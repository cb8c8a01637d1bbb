"""Input files cut into records and records packed into payloads (SageMaker's SplitType and BatchStrategy)."""

from __future__ import annotations

import gzip
import struct

import pytest

from batchscore_runtime.records import (
    FileError,
    Payload,
    crc32c,
    decompress,
    masked_crc32c,
    pack_payloads,
    split_records,
)

MAGIC = 0xCED7230A


def recordio_part(data: bytes, cflag: int = 0) -> bytes:
    """One RecordIO part as MXNet writes it: magic, lrecord (cflag << 29 | length), data, padding."""
    return struct.pack("<II", MAGIC, (cflag << 29) | len(data)) + data + b"\0" * (-len(data) % 4)


def tfrecord(data: bytes) -> bytes:
    """One TFRecord as TensorFlow writes it."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def error_of(data: bytes, split_type: str) -> tuple[str, str, int | None]:
    with pytest.raises(FileError) as caught:
        split_records(data, split_type)
    return caught.value.type, caught.value.message, caught.value.record


# --------------------------------------------------------------------------- splitting


def test_none_is_the_whole_file() -> None:
    assert split_records(b"a,b\n1,2\n", "None") == [b"a,b\n1,2\n"]
    assert split_records(b"", "None") == [b""]


def test_lines_drop_newlines_carriage_returns_and_blank_lines() -> None:
    data = b"1,2\r\n\n3,4\n  \n5,6"
    assert split_records(data, "Line") == [b"1,2", b"3,4", b"5,6"]
    assert split_records(b"", "Line") == []


def test_recordio_keeps_framing_and_multipart_records() -> None:
    one = recordio_part(b"abc")
    multi = recordio_part(b"hello", 1) + recordio_part(b"-", 2) + recordio_part(b"world!!!", 3)
    three = recordio_part(b"")
    assert split_records(one + multi + three, "RecordIO") == [one, multi, three]
    assert len(one) == 12 and one.endswith(b"abc\0")


def test_recordio_bad_magic_names_the_offset() -> None:
    data = recordio_part(b"abcd") + struct.pack("<II", 0x12345678, 4) + b"abcd"
    assert error_of(data, "RecordIO") == (
        "CorruptInput",
        "bad RecordIO magic 0x12345678 at byte 12 (expected 0xced7230a)",
        2,
    )


def test_recordio_truncations() -> None:
    good = recordio_part(b"abcd")
    assert error_of(good + recordio_part(b"abcdefgh")[:-3], "RecordIO") == (
        "CorruptInput",
        "truncated RecordIO record 2 at byte 12: its header says 8 bytes of data, 5 remain",
        2,
    )
    assert error_of(good + b"\x0a\x23", "RecordIO")[1] == (
        "truncated RecordIO record 2 at byte 12: 2 bytes left, a header needs 8"
    )
    assert error_of(good + recordio_part(b"ab", 1), "RecordIO")[1] == (
        "truncated RecordIO record 2 at byte 12: its last part is missing"
    )
    assert error_of(recordio_part(b"ab", 1) + good, "RecordIO")[1] == (
        "truncated RecordIO record 1 at byte 0: its last part is missing (a new record starts at byte 12)"
    )
    assert error_of(good + recordio_part(b"ab", 3), "RecordIO")[1] == (
        "RecordIO part at byte 12 (cflag 3) continues a record that never started"
    )


def test_crc32c_known_values() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    assert crc32c(b"") == 0
    assert masked_crc32c(b"") == 0xA282EAD8


def test_tfrecord_keeps_framing() -> None:
    records = [tfrecord(b"first example"), tfrecord(b""), tfrecord(b"x" * 300)]
    assert split_records(b"".join(records), "TFRecord") == records
    assert len(records[0]) == 8 + 4 + 13 + 4


def test_tfrecord_corruption_names_the_offset() -> None:
    first = tfrecord(b"abc")  # 19 bytes
    broken = bytearray(tfrecord(b"defg"))
    broken[8] ^= 0xFF  # the length's CRC
    assert error_of(first + bytes(broken), "TFRecord") == (
        "CorruptInput",
        "TFRecord 2 at byte 19: the length's CRC does not match (not a TFRecord file, or corrupt)",
        2,
    )
    assert error_of(first + tfrecord(b"defg")[:-2], "TFRecord")[1] == (
        "truncated TFRecord 2 at byte 19: its header says 4 bytes of data and a 4-byte CRC, 6 remain"
    )
    assert error_of(first + b"\x04\x00\x00", "TFRecord")[1] == (
        "truncated TFRecord 2 at byte 19: 3 bytes left, a header needs 12"
    )
    assert error_of(b"id,value\n1,2\n", "TFRecord")[1].startswith("TFRecord 1 at byte 0: the length's CRC does not match")


def test_data_crc_is_not_checked() -> None:
    record = bytearray(tfrecord(b"abc"))
    record[-1] ^= 0xFF
    assert split_records(bytes(record), "TFRecord") == [bytes(record)]


def test_gzip() -> None:
    assert decompress(gzip.compress(b"1,2\n"), "Gzip") == b"1,2\n"
    assert decompress(b"1,2\n", "None") == b"1,2\n"
    with pytest.raises(FileError) as caught:
        decompress(b"1,2\n", "Gzip")
    assert (caught.value.type, caught.value.message) == ("CorruptInput", "not a gzip file: Not a gzipped file (b'1,')")
    with pytest.raises(FileError) as caught:
        decompress(gzip.compress(b"1,2\n" * 100)[:20], "Gzip")
    assert caught.value.message == "not a gzip file: Compressed file ended before the end-of-stream marker was reached"


# --------------------------------------------------------------------------- payloads


def test_multi_record_fills_payloads_up_to_the_byte() -> None:
    mb = 1024 * 1024
    exact = [b"a" * (mb // 4 - 1)] * 4  # each line is a quarter MiB with its newline
    assert [(p.first, p.count, len(p.body)) for p in pack_payloads(exact, "Line", "MULTI_RECORD", 1)] == [(1, 4, mb)]
    over = exact[:3] + [b"a" * (mb // 4)]  # one byte more
    assert [(p.first, p.count, len(p.body)) for p in pack_payloads(over, "Line", "MULTI_RECORD", 1)] == [
        (1, 3, 3 * mb // 4),
        (4, 1, mb // 4 + 1),
    ]


def test_lines_are_sent_with_newlines_and_binary_records_as_they_are() -> None:
    assert pack_payloads([b"1,2", b"3,4"], "Line", "MULTI_RECORD", 6) == [Payload(1, 2, b"1,2\n3,4\n")]
    assert pack_payloads([b"1,2", b"3,4", b"5"], "Line", "SINGLE_RECORD", 6) == [
        Payload(1, 1, b"1,2\n"),
        Payload(2, 1, b"3,4\n"),
        Payload(3, 1, b"5\n"),
    ]
    assert pack_payloads([b"AB", b"CD"], "RecordIO", "MULTI_RECORD", 6) == [Payload(1, 2, b"ABCD")]
    assert [p.label for p in pack_payloads([b"x"] * 3, "Line", "SINGLE_RECORD", 1)] == ["record 1", "record 2", "record 3"]
    assert Payload(5, 5, b"").label == "records 5-9"


def test_a_record_over_the_cap_fails_its_file() -> None:
    mb = 1024 * 1024
    with pytest.raises(FileError) as caught:
        pack_payloads([b"1", b"2", b"x" * (7 * mb - 1)], "Line", "MULTI_RECORD", 6)
    assert (caught.value.type, caught.value.record, caught.value.message) == (
        "RecordTooLarge",
        3,
        "record 3 is 7,340,032 bytes, over MaxPayloadInMB = 6 (6,291,456 bytes)",
    )
    with pytest.raises(FileError) as caught:
        pack_payloads([b"x" * (mb + 1)], "None", "MULTI_RECORD", 1)
    assert caught.value.message == (
        "the file is 1,048,577 bytes, over MaxPayloadInMB = 1 (1,048,576 bytes); "
        "with SplitType None the whole file is one request"
    )
    assert pack_payloads([b"x" * mb], "None", "SINGLE_RECORD", 1) == [Payload(1, 1, b"x" * mb)]
