"""Large-file splitting: parts end between records, never inside a quoted CSV field, and come back in order."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore import split
from batchscore.partition import partition_by_size
from batchscore.split import record_boundaries, split_large_files
from batchscore_runtime.formats import FilePart, InputFile, MiniBatch, Summary
from batchscore_runtime.slices import part_name, sliced_inputs
from tests.helpers import deployment_file, run_dag, write


def entry(path: Path, root: Path) -> InputFile:
    st = path.stat()
    return InputFile(path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns)


def materialized(parts: list[InputFile], root: Path, work: Path) -> list[bytes]:
    """What the scoring script would read for each part, written by the runtime's own code."""
    mb = MiniBatch(0, parts)
    with sliced_inputs(mb, [str(root / f.path) for f in parts], work) as paths:
        return [Path(p).read_bytes() for p in paths]


def tricky_csv(rows: int, seed: int = 3) -> bytes:
    """A CSV whose quoted fields hold newlines, escaped quotes and commas."""
    rng = random.Random(seed)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "text", "value"])
    for i in range(rows):
        text = rng.choice(["plain", "two\nlines", 'say ""hi""\nand\n\nbye', "a,b", '"quoted"', ""])
        writer.writerow([i, text.replace('""', '"'), rng.random()])
    return out.getvalue().encode()


@pytest.mark.parametrize("chunk", [7, 64, 1 << 22])  # boundaries found across read chunks too
def test_csv_parts_never_cut_a_quoted_field_and_rejoin_exactly(tmp_path: Path, monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(split, "READ_CHUNK", chunk)
    data = tricky_csv(400)
    big = tmp_path / "in" / "big.csv"
    big.parent.mkdir()
    big.write_bytes(data)

    parts = split_large_files([entry(big, tmp_path / "in")], tmp_path / "in", size=len(data) // 6)

    assert len(parts) >= 5
    assert [p.part.index for p in parts] == list(range(len(parts)))
    assert {p.part.count for p in parts} == {len(parts)}
    header_end = data.index(b"\n") + 1
    assert all(p.part.header_end == header_end for p in parts)
    assert parts[0].part.start == header_end and parts[-1].part.end == len(data)
    assert all(a.part.end == b.part.start for a, b in zip(parts, parts[1:]))  # no gap, no overlap
    texts = materialized(parts, tmp_path / "in", tmp_path / "work")
    frames = [pd.read_csv(io.BytesIO(t), keep_default_na=False) for t in texts]
    assert all(list(f.columns) == ["id", "text", "value"] for f in frames)  # every part has the header
    whole = pd.read_csv(io.BytesIO(data), keep_default_na=False)
    pd.testing.assert_frame_equal(pd.concat(frames, ignore_index=True), whole)
    assert not list((tmp_path / "work").iterdir())  # the part files are removed after the attempt


def test_record_boundaries_skip_newlines_inside_quotes(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_bytes(b'h\n"a\nb\nc"\nd\n')
    #                  0 1 2  3 4 5 6 7 8 9 10 11
    assert record_boundaries(path, [0], quoted=True) == [2]
    assert record_boundaries(path, [3, 5], quoted=True) == [10]  # 4 and 6 are inside the quoted field
    assert record_boundaries(path, [3, 5], quoted=False) == [5, 7]


def test_json_lines_parts_end_at_newlines(tmp_path: Path) -> None:
    lines = [json.dumps({"id": i, "pad": "x" * (i % 17)}) for i in range(300)]
    data = ("\n".join(lines) + "\n").encode()
    (tmp_path / "big.jsonl").write_bytes(data)

    parts = split_large_files([entry(tmp_path / "big.jsonl", tmp_path)], tmp_path, size=-(-len(data) // 4))

    assert len(parts) == 4 and all(p.part.header_end == 0 for p in parts)
    texts = materialized(parts, tmp_path, tmp_path / "work")
    assert b"".join(texts) == data
    assert all(t.endswith(b"\n") and t.startswith(b"{") for t in texts)
    sizes = [len(t) for t in texts]
    assert max(sizes) / (sum(sizes) / len(sizes)) < 1.1  # about equal parts


def test_parquet_parts_are_runs_of_row_groups(tmp_path: Path) -> None:
    table = pa.table({"id": list(range(10_000)), "v": [float(i) for i in range(10_000)]})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=1000)  # 10 row groups
    pq.write_table(table, tmp_path / "one.parquet", row_group_size=20_000)  # a single row group: not cut
    files = [entry(tmp_path / "big.parquet", tmp_path), entry(tmp_path / "one.parquet", tmp_path)]

    meta = pq.ParquetFile(tmp_path / "big.parquet").metadata
    group_bytes = [
        meta.row_group(g).column(0).total_compressed_size + meta.row_group(g).column(1).total_compressed_size for g in range(10)
    ]

    parts = split_large_files(files, tmp_path, size=sum(group_bytes[:4]))  # 4 row groups fit

    big = [p for p in parts if p.path == "big.parquet"]
    target = sum(group_bytes[:4])
    assert len(big) == 3 and {p.part.kind for p in big} == {FilePart.ROW_GROUPS}
    bounds = [big[0].part.start] + [p.part.end for p in big]
    assert bounds[0] == 0 and bounds[-1] == 10 and all(a.part.end == b.part.start for a, b in zip(big, big[1:]))
    assert [p.size for p in big] == [sum(group_bytes[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert all(p.size <= target for p in big) and all(p.part.end - p.part.start in (3, 4) for p in big)  # balanced
    assert [p.path for p in parts][-1] == "one.parquet" and parts[-1].part is None
    work = tmp_path / "work"
    with sliced_inputs(MiniBatch(0, big), [str(tmp_path / "big.parquet")] * len(big), work) as paths:
        assert [Path(p).name for p in paths] == [f"big.part-000{k}-of-0003.parquet" for k in (1, 2, 3)]
        rejoined = pa.concat_tables([pq.read_table(p) for p in paths])
    assert rejoined.equals(table)


def test_small_files_and_other_formats_are_never_cut(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(b"x\n" * 5000)
    (tmp_path / "small.csv").write_bytes(b"a\n1\n")
    files = [entry(tmp_path / "big.bin", tmp_path), entry(tmp_path / "small.csv", tmp_path)]
    assert split_large_files(files, tmp_path, size=100) == files


def test_a_linked_large_csv_is_cut_from_its_target_and_its_parts_keep_the_links_name(tmp_path: Path) -> None:
    from batchscore.plan import list_input_files
    from batchscore_runtime.azure import resolve_inputs
    from tests.helpers import load

    inputs = tmp_path / "in"
    data = tricky_csv(300)
    (inputs / "store").mkdir(parents=True)
    (inputs / "store" / "big-v3.csv").write_bytes(data)
    (inputs / "big.csv").symlink_to(inputs / "store" / "big-v3.csv")  # absolute, inside
    (inputs / "host.csv").symlink_to(write(tmp_path / "host.csv", "id\n" + "1\n" * 5000))  # outside: never read
    (tmp_path / "model").mkdir()
    write(tmp_path / "code" / "score.py", "def run(mb):\n    return mb\n")
    d = load(deployment_file(tmp_path / "yaml", model=tmp_path / "model", code=tmp_path / "code", inputs=inputs)).deployments[0]
    listed = list_input_files(d)
    assert [(f.path, f.target, f.size, bool(f.refused)) for f in listed] == [
        ("big.csv", "store/big-v3.csv", len(data), False),
        ("host.csv", None, 0, True),
    ]

    parts = split_large_files(listed, inputs, size=len(data) // 3)

    big = parts[:-1]
    assert len(big) >= 3 and parts[-1] == listed[1]
    assert {(p.path, p.target) for p in big} == {("big.csv", "store/big-v3.csv")}
    mb = MiniBatch(0, big)
    located = resolve_inputs(mb, inputs)
    assert located == [str(inputs / "store" / "big-v3.csv")] * len(big)
    with sliced_inputs(mb, located, tmp_path / "work") as paths:
        assert [Path(p).name for p in paths] == [f"big.part-{k:04d}-of-{len(big):04d}.csv" for k in range(1, len(big) + 1)]
        rejoined = [Path(p).read_bytes() for p in paths]
    header = data[: data.index(b"\n") + 1]
    assert rejoined[0].startswith(header) and b"".join([rejoined[0]] + [r[len(header) :] for r in rejoined[1:]]) == data


def test_parts_balance_size_mode_mini_batches() -> None:
    # One file of 10 units among small ones: uncut, it is a mini-batch of its own and 10x the others.
    small = [InputFile(f"s{i}.csv", 1, 0) for i in range(20)]
    big = InputFile("big.csv", 10, 0)
    parts = [InputFile("big.csv", 2, 0, FilePart(k, 5, FilePart.BYTES, 2 * k, 2 * k + 2, 0, 10)) for k in range(5)]
    uncut = partition_by_size([*small, big], 2, 100)
    cut = partition_by_size([*small, *parts], 2, 100)
    assert max(mb.bytes for mb in uncut) == 10
    assert max(mb.bytes for mb in cut) == 2
    assert part_name(parts[1]) == "big.part-0002-of-0005.csv"


def test_a_large_csv_is_scored_in_parts_and_comes_back_whole_and_in_order(
    scoring_image: str, airflow_db, tmp_path: Path, monkeypatch
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    data = tricky_csv(3000, seed=11)
    (inputs / "a-big.csv").write_bytes(data)
    (inputs / "b-small.csv").write_bytes(b"id,text,value\n9001,last,0.5\n")
    (tmp_path / "model").mkdir()
    write(
        tmp_path / "code" / "score.py",
        """
        import os
        import pandas as pd

        def run(mini_batch):
            frames = []
            for path in mini_batch:
                df = pd.read_csv(path, keep_default_na=False)
                frames.append(df.assign(source=os.path.basename(path)))
            return pd.concat(frames)
        """,
    )
    path = deployment_file(
        tmp_path / "yaml",
        model=tmp_path / "model",
        code=tmp_path / "code",
        inputs=inputs,
        settings={"mini_batch_size": f"{len(data) / 4 / 1000:.3f}kB"},
    )
    dag_run, endpoint = run_dag(path, monkeypatch)
    assert dag_run.state == "success"

    from batchscore.plan import run_layout

    root = run_layout(endpoint.deployments[0], dag_run.run_id).root
    out = pd.read_csv(root / "predictions.csv", keep_default_na=False)
    expected = pd.concat(
        [pd.read_csv(inputs / "a-big.csv", keep_default_na=False), pd.read_csv(inputs / "b-small.csv", keep_default_na=False)],
        ignore_index=True,
    )
    pd.testing.assert_frame_equal(out[["id", "text", "value"]], expected)  # whole, in input order
    sources = out["source"].drop_duplicates().tolist()
    assert sources[:2] == ["a-big.part-0001-of-0008.csv", "a-big.part-0002-of-0008.csv"]  # parts of half a mini-batch
    assert sources[-1] == "b-small.csv"
    summary = Summary.read(root / "summary.json")
    assert summary.status == Summary.SUCCEEDED and summary.mini_batches.total >= 4
    assert not list((root / "_batchscore").rglob("parts-*"))  # part files are removed (with the scratch folders)
