"""The JSONPath subset of SageMaker's DataProcessing, CSV/JSON records, the join and the filters."""

from __future__ import annotations

import pytest

from batchscore_runtime.jsonpath import (
    DataProcessing,
    FilterMiss,
    parse,
    read_record,
    record_format,
    split_outputs,
    write_record,
)
from batchscore_runtime.records import FileError

DOC = {"id": 7, "features": [1.5, 2.5, 3.5, 4.5], "meta": {"src": "s3", "tags": ["a", "b"]}, "name": "x"}
ROW = ["id", "f1", "f2", "f3"]


@pytest.mark.parametrize(
    ("expr", "value", "expected"),
    [
        ("$", DOC, DOC),
        ("  $  ", ROW, ROW),
        ("$.id", DOC, 7),
        ("$.meta.src", DOC, "s3"),
        ("$['name']", DOC, "x"),
        ('$["name"]', DOC, "x"),
        ("$['id','name']", DOC, {"id": 7, "name": "x"}),
        ("$['name', 'id']", DOC, {"name": "x", "id": 7}),
        ("$[0]", ROW, "id"),
        ("$[-1]", ROW, "f3"),
        ("$[1,3]", ROW, ["f1", "f3"]),
        ("$[0,2:]", ROW, ["id", "f2", "f3"]),
        ("$[1:]", ROW, ["f1", "f2", "f3"]),
        ("$[:-1]", ROW, ["id", "f1", "f2"]),
        ("$[1:3]", ROW, ["f1", "f2"]),
        ("$[-2:]", ROW, ["f2", "f3"]),
        ("$[5:]", ROW, []),
        ("$.*", DOC, DOC),
        ("$[*]", ROW, ROW),
        ("$.features[0:2]", DOC, [1.5, 2.5]),
        ("$.features[-1]", DOC, 4.5),
        ("$.meta.tags[1]", DOC, "b"),
        ("$['meta']['tags'][0]", DOC, "a"),
        ("$[*].id", [{"id": 1}, {"id": 2}], [1, 2]),
        ("$[0:2][0]", [["a", "b"], ["c", "d"], ["e"]], ["a", "c"]),
        ("$['id','meta'].*", {"id": [1], "meta": {"k": 2}}, {"id": [1], "meta": {"k": 2}}),
        ("$['it\\'s']", {"it's": 1}, 1),
        ("$['a.b']", {"a.b": 2}, 2),
    ],
)
def test_selects(expr: str, value, expected) -> None:
    assert parse(expr).apply(value) == expected


@pytest.mark.parametrize(
    ("expr", "value", "reason"),
    [
        ("$.missing", DOC, "no key 'missing' (the object has 'id', 'features', 'meta', 'name')"),
        ("$['id','nope']", DOC, "no key 'nope' (the object has 'id', 'features', 'meta', 'name')"),
        ("$[4]", ROW, "index 4 is out of range (the array has 4 elements)"),
        ("$[-5]", ROW, "index -5 is out of range (the array has 4 elements)"),
        ("$[0,9]", ROW, "index 9 is out of range (the array has 4 elements)"),
        ("$.id", ROW, ".id needs an object, found an array"),
        ("$[0]", DOC, "[0] needs an array, found an object"),
        ("$.id.x", DOC, ".x needs an object, found a number"),
        ("$.*", "text", ".* needs an object or an array, found a string"),
        ("$.a", {}, "no key 'a' (the object has no keys)"),
    ],
)
def test_misses(expr: str, value, reason: str) -> None:
    with pytest.raises(FilterMiss) as caught:
        parse(expr).apply(value)
    assert str(caught.value) == reason


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("id", "JSONPath 'id' must start with '$' (the record)"),
        ("", "JSONPath '' must start with '$' (the record)"),
        ("$..id", "JSONPath '$..id', character 2: recursive descent ('..') is not supported"),
        (
            "$[?(@.a > 1)]",
            "JSONPath '$[?(@.a > 1)]', character 3: filter and script expressions ([?(...)], [(...)]) are not supported",
        ),
        (
            "$[(@.length-1)]",
            "JSONPath '$[(@.length-1)]', character 3: filter and script expressions ([?(...)], [(...)]) are not supported",
        ),
        ("$[0:4:2]", "JSONPath '$[0:4:2]', character 6: slice steps ([a:b:c]) are not supported"),
        ("$[0", "JSONPath '$[0', character 2: '[' is never closed"),
        ("$['a]", "JSONPath \"$['a]\", character 5: the key's quote ' is never closed"),
        ("$['a',0]", "JSONPath \"$['a',0]\", character 2: keys and indexes cannot be mixed in one [...]"),
        ("$[*,1]", "JSONPath '$[*,1]', character 2: '*' cannot be combined with keys or indexes in one [...]"),
        ("$[]", "JSONPath '$[]', character 3: expected an index, a slice, a quoted key or '*', found ']'"),
        ("$[a]", "JSONPath '$[a]', character 3: expected an index, a slice, a quoted key or '*', found 'a'"),
        ("$.", "JSONPath '$.', character 3: '.' must be followed by a key name or '*' (use ['key'] for other keys)"),
        ("$.1a", "JSONPath '$.1a', character 3: '.' must be followed by a key name or '*' (use ['key'] for other keys)"),
        ("$[0 1]", "JSONPath '$[0 1]', character 5: expected ',' or ']', found '1'"),
        ("$x", "JSONPath '$x', character 2: unexpected 'x'; a step is .key, .*, or [...]"),
    ],
)
def test_unsupported_syntax(expr: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse(expr)
    assert str(caught.value) == message


def test_identity() -> None:
    assert parse("$").identity and not parse("$[*]").identity


# --------------------------------------------------------------------------- records


def test_record_formats() -> None:
    assert record_format("text/csv") == "csv"
    assert record_format("Text/CSV; charset=utf-8") == "csv"
    assert record_format("application/jsonlines") == record_format("application/json") == "json"
    assert record_format("application/x-image") is None and record_format(None) is None


def test_csv_and_json_records_round_trip() -> None:
    assert read_record(b'1,"a,b",,x', "csv") == ["1", "a,b", "", "x"]
    assert write_record(["1", "a,b", "", 'say "hi"'], "csv") == b'1,"a,b",,"say ""hi"""'
    assert write_record("0.9", "csv") == b"0.9"
    assert write_record([1, 0.5, None, True, {"k": 1}], "csv") == b'1,0.5,,true,"{""k"":1}"'
    assert read_record('{"a": [1, "é"]}'.encode(), "json") == {"a": [1, "é"]}
    assert write_record({"a": [1, "é"]}, "json") == '{"a":[1,"é"]}'.encode()
    with pytest.raises(ValueError, match="a CSV record must be one row, this one has 2"):
        read_record(b"1,2\n3,4", "csv")


def test_split_outputs() -> None:
    assert split_outputs(b"1,a\n2,b\n", "csv", 2) == [["1", "a"], ["2", "b"]]
    assert split_outputs(b"0.5\r\n0.7", "csv", 2) == [["0.5"], ["0.7"]]
    assert split_outputs(b'{"p": 1}\n{"p": 2}\n', "json", 2) == [{"p": 1}, {"p": 2}]
    assert split_outputs(b"[0.1, 0.9]", "json", 2) == [0.1, 0.9]
    assert split_outputs(b"[\n 1,\n 2\n]", "json", 2) == [1, 2]  # an array over as many lines as records
    assert split_outputs(b"[0.1, 0.9]\n", "json", 1) == [[0.1, 0.9]]  # one record: the body is its output
    with pytest.raises(ValueError, match="^the response has 1 lines for 2 records$"):
        split_outputs(b"1\n", "csv", 2)
    with pytest.raises(ValueError, match=r"^the response is a JSON array of 3 elements for 2 records$"):
        split_outputs(b"[1, 2, 3]", "json", 2)
    with pytest.raises(ValueError, match=r"^the response is one JSON value \(an object\) for 2 records$"):
        split_outputs(b'{"a": 1}', "json", 2)
    with pytest.raises(ValueError, match=r"^the response is neither 3 JSON lines nor a JSON array \(2 lines\)$"):
        split_outputs(b"1\n2 3\n", "json", 3)


# --------------------------------------------------------------------------- DataProcessing


def processing(**settings) -> DataProcessing | None:
    values = dict(
        content_type="text/csv", accept=None, split_type="Line", input_filter="$", output_filter="$", join_source="None"
    )
    values.update(settings)
    return DataProcessing.from_settings(**values)


def test_no_processing_when_everything_is_default() -> None:
    assert processing(content_type=None, split_type="RecordIO") is None


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"DataProcessing needs ContentType text/csv or a JSON type .*, got 'image/png'"):
        processing(content_type="image/png", input_filter="$[1:]")
    with pytest.raises(ValueError, match=r"^DataProcessing needs SplitType Line \(one record per line\), got 'None'$"):
        processing(split_type="None", join_source="Input")
    with pytest.raises(ValueError, match="^JoinSource must be None or Input, got 'Output'$"):
        processing(join_source="Output")
    with pytest.raises(ValueError, match="recursive descent"):
        processing(output_filter="$..x")


def test_csv_input_filter_join_and_output_filter() -> None:
    dp = processing(input_filter="$[1:]", join_source="Input", output_filter="$[0,-1]")
    assert dp.filter_input(b"7,5.1,3.5", 1) == b"5.1,3.5"
    [output] = dp.outputs(b"setosa\n", 1, 1, "record 1")
    assert dp.finish(b"7,5.1,3.5", output, 1) == b"7,setosa"


def test_json_join_puts_the_output_under_sagemaker_output() -> None:
    dp = processing(content_type="application/jsonlines", input_filter="$.features", join_source="Input")
    record = b'{"id": 1, "features": [1, 2]}'
    assert dp.filter_input(record, 1) == b"[1,2]"
    outputs = dp.outputs(b'{"p": 0.9}\n{"p": 0.1}\n', 1, 2, "records 1-2")
    assert dp.finish(record, outputs[0], 1) == b'{"id":1,"features":[1,2],"SageMakerOutput":{"p":0.9}}'
    with pytest.raises(FileError) as caught:
        dp.finish(b"[1, 2]", outputs[1], 2)
    assert (caught.value.type, caught.value.record, caught.value.message) == (
        "JoinError",
        2,
        "JoinSource Input needs a JSON object per record to add SageMakerOutput to; record 2 is an array",
    )


def test_csv_output_of_json_input_is_read_as_csv() -> None:
    dp = processing(
        content_type="application/jsonlines", accept="text/csv", join_source="Input", output_filter="$['id','SageMakerOutput']"
    )
    [output] = dp.outputs(b"0.5,yes\n", 1, 1, "record 1")
    assert dp.finish(b'{"id": "a", "x": 1}', output, 1) == b'{"id":"a","SageMakerOutput":["0.5","yes"]}'


def test_filter_and_record_errors_name_the_record() -> None:
    dp = processing(content_type="application/json", input_filter="$.features", output_filter="$.p")
    with pytest.raises(FileError) as caught:
        dp.filter_input(b'{"id": 1}', 4)
    assert (caught.value.type, caught.value.record, caught.value.message) == (
        "FilterError",
        4,
        "InputFilter '$.features' selects nothing in record 4: no key 'features' (the object has 'id')",
    )
    with pytest.raises(FileError) as caught:
        dp.filter_input(b"{not json", 2)
    assert (caught.value.type, caught.value.message) == (
        "CorruptInput",
        "record 2 is not JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
    )
    with pytest.raises(FileError) as caught:
        dp.outputs(b"[1, 2]", 3, 3, "records 3-5")
    assert (caught.value.type, caught.value.record, caught.value.message) == (
        "OutputMismatch",
        3,
        "records 3-5: the response is a JSON array of 2 elements for 3 records",
    )
    with pytest.raises(FileError) as caught:
        dp.finish(b"", {"q": 1}, 5)
    assert caught.value.message == "OutputFilter '$.p' selects nothing in record 5: no key 'p' (the object has 'q')"
