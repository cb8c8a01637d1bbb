"""Skew: the heaviest mini-batch's work (bytes) over the mean, count-based against size-aware.

File sizes follow a Zipf law (``numpy.random.zipf``), capped; no file is written, the planner
gets :class:`~batchscore_runtime.formats.InputFile` records. Count-based mini-batches
(:func:`batchscore.plan.partition`, Azure's ``mini_batch_size: N``) and size-aware ones
(:func:`batchscore.partition.partition_by_size`, ``mini_batch_size: "64MB"``) are cut at the same
number of mini-batches. A file bigger than the target is a mini-batch of its own, so the
largest file over the mean bounds the size-aware ratio; the headline therefore also plans
with such files pre-split as large-file splitting (:mod:`batchscore.split`) cuts a CSV, JSON
Lines or Parquet file: into equal pieces of at most :func:`batchscore.split.part_size` (half
the target, for files over half the target). For comparison (no target), it also plans with
pieces of a whole target.
"""

from __future__ import annotations

import math

import numpy as np

from batchscore.partition import partition, partition_by_size
from batchscore.spec import Settings, size_bytes
from batchscore.split import part_size
from batchscore_runtime.formats import InputFile, MiniBatch
from bench.common import Result

NAME = "skew"
TITLE = "slowest mini-batch's bytes over the mean: count-based vs size-aware mini-batches"
TARGET = 1.15
SMALL = {"files": 500}


def zipf_files(count: int, *, exponent: float, unit: int, cap: int, seed: int) -> list[InputFile]:
    """``count`` files of ``zipf(exponent) * unit`` bytes each, at most ``cap``."""
    draws = np.random.default_rng(seed).zipf(exponent, count)
    sizes = np.minimum(np.minimum(draws, cap // unit + 1) * unit, cap)  # clipped first: no int64 overflow
    return [InputFile(path=f"part-{i:05d}.bin", size=int(s), mtime_ns=0) for i, s in enumerate(sizes)]


def split_large(files: list[InputFile], threshold: int, size: int) -> list[InputFile]:
    """Every file bigger than ``threshold`` as ``ceil(bytes / size)`` pieces of (almost) equal size."""
    pieces: list[InputFile] = []
    for f in files:
        n = max(1, math.ceil(f.size / size)) if f.size > threshold else 1
        base, extra = divmod(f.size, n)
        pieces += [
            InputFile(path=f.path if n == 1 else f"{f.path}#{k}", size=base + (k < extra), mtime_ns=f.mtime_ns) for k in range(n)
        ]
    return pieces


def skew(batches: list[MiniBatch]) -> float:
    """The heaviest mini-batch's bytes over the mean mini-batch's."""
    sizes = [mb.bytes for mb in batches]
    return max(sizes) / (sum(sizes) / len(sizes))


def _same_count(files: list[InputFile], batches: int) -> list[MiniBatch]:
    """Count-based mini-batches, as many as ``batches`` (or as close as a whole mini_batch_size gets)."""
    return partition(files, max(1, round(len(files) / batches)))


def run(
    files: int = 5000, target: str = "64MB", cap_mb: int = 200, unit_kib: int = 16, exponent: float = 1.3, seed: int = 6
) -> Result:
    """Plan ``files`` Zipf-sized files both ways; the checks are on the size-aware skew."""
    result = Result(NAME, TITLE)
    max_files = Settings.model_fields["max_files_per_mini_batch"].default
    target_bytes = size_bytes(target)
    inputs = zipf_files(files, exponent=exponent, unit=unit_kib * 1024, cap=cap_mb * 10**6, seed=seed)
    total = sum(f.size for f in inputs)
    result.figure("files", len(inputs), "", f"files, sizes zipf({exponent}) x {unit_kib} KiB, capped at {cap_mb} MB")
    result.figure("total_gb", total / 1e9, "GB", "total bytes")
    result.figure("files_over_target", sum(f.size > target_bytes for f in inputs), "", f"files larger than {target}")

    by_size = partition_by_size(inputs, target_bytes, max_files)
    by_count = _same_count(inputs, len(by_size))
    mean = total / len(by_size)
    result.figure("size_mini_batches", len(by_size), "", f"mini-batches, size-aware at {target}")
    each = len(by_count[0].files)
    result.figure("count_mini_batches", len(by_count), "", f"mini-batches, count-based at {each} files each")
    count_skew = result.figure("count_skew", skew(by_count), "x", "count-based: heaviest / mean")
    size_skew = result.figure("size_skew", skew(by_size), "x", "size-aware: heaviest / mean")
    result.figure("largest_file_over_mean", max(f.size for f in inputs) / mean, "x", "largest file / mean size-aware mini-batch")
    result.figure("count_over_size", count_skew / size_skew, "x", "count-based skew / size-aware skew")

    half = part_size(target_bytes)
    pieces = split_large(inputs, half, half)
    split_by_size = partition_by_size(pieces, target_bytes, max_files)
    split_by_count = _same_count(pieces, len(split_by_size))
    result.figure("pieces", len(pieces), "", f"pieces after cutting files over half of {target} into parts of at most half")
    result.figure("split_size_mini_batches", len(split_by_size), "", "mini-batches, size-aware, split")
    result.figure("split_count_skew", skew(split_by_count), "x", "count-based, split: heaviest / mean")
    split_skew = result.figure("split_size_skew", skew(split_by_size), "x", "size-aware, split: heaviest / mean")

    whole = partition_by_size(split_large(inputs, target_bytes, target_bytes), target_bytes, max_files)
    result.figure("split_whole_size_skew", skew(whole), "x", "size-aware, parts of a whole target: heaviest / mean")

    result.check("size-aware skew, large files split (simulated)", split_skew, "<=", TARGET)
    result.check("size-aware skew, no splitting", size_skew, "<=", TARGET)
    return result
