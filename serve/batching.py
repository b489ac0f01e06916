"""Dynamic batching that forms each batch when the model is free.

``Batcher(fn)`` queues the items that requests ``submit`` and calls ``fn(items)`` (one result or exception per item)
on one batch at a time. A batch is formed when the previous one has finished and takes every item queued by then,
up to ``max_size`` (counted by ``size``): under load the batch grows with the queue that built up while the model
ran, and at low load a request waits for nothing. ``wait_s`` > 0 adds a timer only when the model is idle: the
first item of a batch then waits up to ``wait_s`` for others to join it (Triton's ``max_queue_delay``).

Why not ``@serve.batch``: it closes a batch when its timer runs out even while the model is still busy with the
previous one, so under a steady load every request pays the timer; with a timer of 0 its batches hold one request
each. ``bench/serve.py`` measured both on the same machine (serve/README.md).
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from typing import Any, Awaitable, Callable, Optional, Sequence


class Batcher:
    """One consumer task per event loop (started by the first ``submit``); batches never overlap.

    ``fn(items)`` returns one result per item, in order; a result that is an ``Exception`` is raised to that item's
    caller only. If ``fn`` itself raises, every item of that batch gets the error. A caller that is cancelled (a
    request timeout) leaves the queue: its item is skipped if its batch has not formed yet.
    """

    def __init__(self, fn: Callable[[list[Any]], Awaitable[Sequence[Any]]], max_size: int, wait_s: float = 0.0,
                 size: Callable[[Any], int] = lambda item: 1) -> None:
        self._fn, self._size = fn, size
        self.configure(max_size, wait_s)
        self._queue: collections.deque[tuple[Any, asyncio.Future, float]] = collections.deque()
        self._arrived: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self.batches = self.filled = self.largest = 0  # since start: batches run, their summed and largest size

    def stats(self) -> dict[str, int]:
        """Batches run since start, the items (by ``size``) they held, and the largest."""
        return {"batches": self.batches, "size_total": self.filled, "size_largest": self.largest}

    def configure(self, max_size: int, wait_s: float) -> None:
        """Takes effect from the next batch."""
        if int(max_size) < 1 or not (float(wait_s) >= 0.0 and math.isfinite(float(wait_s))):
            raise ValueError(f"max_batch_size must be an integer >= 1 and batch_wait_timeout_s a finite number >= 0, "
                             f"got {max_size!r} and {wait_s!r}")
        self.max_size, self.wait_s = int(max_size), float(wait_s)

    async def submit(self, item: Any) -> Any:
        """``item``'s result from the batch it joins (its exception raised here)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._arrived = asyncio.Event()
            self._task = loop.create_task(self._run())
        fut = loop.create_future()
        self._queue.append((item, fut, time.monotonic()))
        self._arrived.set()
        result = await fut
        if isinstance(result, Exception):
            raise result
        return result

    def _take(self, items: list, futures: list, filled: int) -> int:
        """Move queued items into the batch while they fit (the first always does); returns the batch's size."""
        while self._queue:
            item, fut, _ = self._queue[0]
            if fut.cancelled():
                self._queue.popleft()
                continue
            n = self._size(item)
            if items and filled + n > self.max_size:
                break
            self._queue.popleft()
            items.append(item)
            futures.append(fut)
            filled += n
        return filled

    async def _run(self) -> None:
        assert self._arrived is not None
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            while self._queue and self._queue[0][1].cancelled():
                self._queue.popleft()
            if not self._queue:
                continue
            items: list = []
            futures: list = []
            deadline = self._queue[0][2] + self.wait_s  # the first item's arrival, plus the idle model's timer
            filled = self._take(items, futures, 0)
            while items and filled < self.max_size and not self._queue and time.monotonic() < deadline:
                self._arrived.clear()
                try:
                    async with asyncio.timeout(deadline - time.monotonic()):
                        await self._arrived.wait()
                except TimeoutError:
                    break
                filled = self._take(items, futures, filled)
            if not items:
                continue
            self.batches, self.filled, self.largest = self.batches + 1, self.filled + filled, max(self.largest, filled)
            try:
                results = list(await self._fn(items))
                if len(results) != len(items):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(items)} items")
            except Exception as e:  # noqa: BLE001 (handed to the callers: this loop must go on)
                results = [e] * len(items)
            for fut, result in zip(futures, results):
                if not fut.done():
                    fut.set_result(result)
