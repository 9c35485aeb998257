"""Reading ahead in a worker thread: a cache's shard reads and hash checks while the device trains,
a harvest's tokenizing while the device runs the model."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def prefetched(
    items: Iterable[T],
    depth: int = 2,
    prepare: Callable[[T], T] | None = None,
    setup: Callable[[], Any] | None = None,
) -> Iterator[T]:
    """The items in order, each read (and `prepare`d) up to `depth` ahead by a worker thread
    (started with `setup`), so a cache's shard reads, hash checks and shuffles, or a pinned copy,
    happen while the device steps; depth 0 reads in line. An error is raised where its item would
    have come; closing stops the reading."""
    it = iter(items)
    done = object()

    def take():
        item = next(it, done)
        return item if item is done or prepare is None else prepare(item)

    if depth == 0:
        while (item := take()) is not done:
            yield item
        return
    # one worker: the iterator is never run twice at once
    pool = ThreadPoolExecutor(max_workers=1, initializer=setup)
    try:
        ahead = deque(pool.submit(take) for _ in range(depth))
        while (item := ahead.popleft().result()) is not done:
            ahead.append(pool.submit(take))
            yield item
    finally:
        pool.shutdown(cancel_futures=True)
