"""The order in which training sees rows, and each rank's part of it, without reading any row.

Rows come in pieces (a cache's shards, a model's windows) laid end to end in a stream. The stream
is cut into blocks of at least `block_rows` rows, each ending on a whole batch (the rows past the
last whole batch open the next block); a block's rows are shuffled (seeded), cut into batches, and
each batch's rows are sorted by their place in the stream. Rank r of n trains on the r-th n-th of
every batch, which, sorted, lies within about the r-th n-th of the block: so a rank reads one
stretch of each block, about 1/n of the data, and n ranks train on the same global batches as one
process (n = 1: the order does not depend on the number of ranks). Sorting within a batch changes
nothing for a loss that is a mean over rows; batch top-k selects within each rank's part anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

VERSION = "blocks/1"
"""Recorded in a run's data identity: a checkpoint made on another order (before this one, rows
were shuffled within buffers of whole shards) is refused on resume, since its remaining batches
would not be the ones an uninterrupted run trains on."""


class Block(NamedTuple):
    start: int
    """Stream position of the block's first row."""
    stop: int
    """Stream position after its last row (a whole number of batches but at the stream's end)."""
    end: int
    """Where the pieces read so far end (>= stop): rows stop..end open the next block."""
    batches: list[np.ndarray]
    """Each global batch's rows as sorted stream positions (the last may be short, at the end)."""


def blocks(
    sizes: Iterable[int], batch_size: int, block_rows: int, rng: np.random.Generator | None
) -> Iterator[Block]:
    """The blocks of a stream of pieces of these sizes (read lazily: a model's windows are
    counted as they come). No rng: the stream's own order, unshuffled."""
    pieces = iter(sizes)
    start = end = 0
    more = True
    while True:
        while more and end - start < max(block_rows, batch_size):
            size = next(pieces, None)
            more = size is not None
            end += size or 0
        stop = start + (end - start) // batch_size * batch_size if more else end
        if stop == start:
            return
        rows = rng.permutation(stop - start) if rng is not None else np.arange(stop - start)
        batches = [
            np.sort(rows[i : i + batch_size]) + start for i in range(0, len(rows), batch_size)
        ]
        yield Block(start, stop, end, batches)
        start = stop


def rank_part(batch: np.ndarray, rank: int, ranks: int) -> np.ndarray:
    """Rank `rank`'s rows of a global batch: its contiguous n-th of the sorted positions."""
    return np.array_split(batch, ranks)[rank]


def span(block: Block, parts: list[np.ndarray]) -> tuple[int, int]:
    """The stretch of stream a rank reads for its parts of a block: from its first row to its last,
    and on to the end of the last piece when it reaches the block's end, since that piece's other
    rows open the next block (so one process reads every piece whole, once)."""
    held = [p for p in parts if len(p)]
    if not held:  # fewer rows than ranks in a stream's last batch
        return block.start, block.start
    lo, hi = min(int(p[0]) for p in held), max(int(p[-1]) for p in held) + 1
    return lo, block.end if hi == block.stop else hi
