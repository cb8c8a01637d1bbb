"""Cutting a run's ordered input files into mini-batches: by file count (Azure's way) or by size, balanced.

Both keep the input order: a mini-batch is a contiguous run of the plan's files, so results come
back in input order. Used by the plan (:mod:`batchscore.plan`) and, for the row groups of a large
Parquet file, by large-file splitting (:mod:`batchscore.split`).
"""

from __future__ import annotations

import bisect

from batchscore_runtime.formats import InputFile, MiniBatch


def partition(files: list[InputFile], mini_batch_size: int) -> list[MiniBatch]:
    """Consecutive runs of ``mini_batch_size`` files (Azure's count-based mini-batches)."""
    return [
        MiniBatch(index=i, files=files[start : start + mini_batch_size])
        for i, start in enumerate(range(0, len(files), mini_batch_size))
    ]


def _cuts(prefix: list[int], limit: int, max_files: int) -> list[int]:
    """Greedy contiguous cuts: each run as long as it stays within ``limit`` bytes and
    ``max_files`` files; a file bigger than ``limit`` makes a run of its own."""
    n = len(prefix) - 1
    cuts, start = [0], 0
    while start < n:
        end = bisect.bisect_right(prefix, prefix[start] + limit, lo=start + 1) - 1  # last index fitting
        end = min(max(end, start + 1), start + max_files, n)
        cuts.append(end)
        start = end
    return cuts


def partition_by_size(files: list[InputFile], target_bytes: int, max_files: int) -> list[MiniBatch]:
    """Contiguous mini-batches of about ``target_bytes`` each, balanced, in input order.

    As many mini-batches as cutting greedily at ``target_bytes`` gives (at most
    ``max_files`` files each; a bigger file alone), then the smallest byte limit that still
    gives that many, so the bytes are spread evenly instead of leaving a small remainder.
    Deterministic: the same files always give the same mini-batches.
    """
    if not files:
        return []
    prefix = [0]
    for f in files:
        prefix.append(prefix[-1] + f.size)
    count = len(_cuts(prefix, target_bytes, max_files)) - 1
    hi = max(target_bytes, 1)
    lo = min(max(1, -(-prefix[-1] // count)), hi)  # no limit below the mean can keep that count
    while lo < hi:  # smallest limit that needs no more mini-batches than the target gave
        mid = (lo + hi) // 2
        if len(_cuts(prefix, mid, max_files)) - 1 <= count:
            hi = mid
        else:
            lo = mid + 1
    cuts = _cuts(prefix, lo, max_files)
    return [MiniBatch(index=i, files=files[a:b]) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
