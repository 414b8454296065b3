"""Dynamic batching: concurrent requests are gathered up to ``max_batch_size`` items or
``max_wait_ms`` and run as one call of a batch function on a single worker thread."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence


class QueueFullError(RuntimeError):
    """The batcher's queue is full; the server answers 503."""


@dataclass
class BatchingConfig:
    """``max_batch_size`` 1 turns batching off (one forward per item, in arrival order)."""

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 4096

    def __post_init__(self) -> None:
        if int(self.max_batch_size) < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if int(self.max_queue) < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1


@dataclass
class BatchStats:
    """Counts of the batches run; ``busy_s`` is the time spent inside the batch function."""

    batches: int = 0
    items: int = 0
    max_batch: int = 0
    busy_s: float = 0.0
    sizes: dict[int, int] = field(default_factory=dict)

    def record(self, n: int, seconds: float = 0.0) -> None:
        self.batches += 1
        self.items += n
        self.busy_s += seconds
        self.max_batch = max(self.max_batch, n)
        self.sizes[n] = self.sizes.get(n, 0) + 1

    def to_dict(self) -> dict:
        return {"batches": self.batches, "items": self.items, "max_batch": self.max_batch,
                "mean_batch": self.items / self.batches if self.batches else 0.0, "busy_s": self.busy_s}


class DynamicBatcher:
    """``await submit(item)`` -> the result for that item of ``fn(list_of_items) -> list_of_results``.

    ``fn`` runs on ``executor`` (share one single-thread executor between batchers so that one
    model forward runs at a time). An exception in ``fn`` fails only the items of that batch.
    """

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], config: BatchingConfig,
                 executor: Executor, name: str = "batcher") -> None:
        self.fn, self.config, self.executor, self.name = fn, config, executor, name
        self.stats = BatchStats()
        self.submitted = 0             # items ever submitted (queued, running or done)
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None
        self._last_batch = 0

    async def start(self) -> None:
        if self._task is None:
            self._queue = asyncio.Queue(maxsize=self.config.max_queue)
            self._task = asyncio.create_task(self._loop(), name=f"{self.name}-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                _, fut = self._queue.get_nowait()
                if not fut.done():
                    fut.set_exception(RuntimeError(f"{self.name} stopped"))

    async def submit(self, item: Any) -> Any:
        if self._queue is None:
            raise RuntimeError(f"{self.name} is not started")
        fut = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, fut))
        except asyncio.QueueFull as err:
            raise QueueFullError(f"{self.name}: {self.config.max_queue} requests already waiting") from err
        self.submitted += 1
        return await fut

    async def submit_many(self, items: Sequence[Any]) -> list[Any]:
        return list(await asyncio.gather(*(self.submit(i) for i in items)))

    async def _gather(self) -> list[tuple[Any, asyncio.Future]]:
        """The next batch: the first waiting item, everything already queued, and -- only when
        traffic is concurrent (this batch or the previous one holds several items) -- whatever
        arrives within ``max_wait_ms``. A lone client therefore never pays the wait."""
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        limit = self.config.max_batch_size
        while len(batch) < limit and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        concurrent = len(batch) > 1 or self._last_batch > 1
        if concurrent and len(batch) < limit and self.config.max_wait_ms > 0:
            deadline = loop.time() + self.config.max_wait_ms / 1000.0
            while len(batch) < limit:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
        self._last_batch = len(batch)
        return batch

    def _timed(self, items: list[Any]) -> tuple[Sequence[Any], float]:
        start = time.perf_counter()
        results = self.fn(items)
        return results, time.perf_counter() - start

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [(i, f) for i, f in await self._gather() if not f.done()]
            if not batch:
                continue
            items = [i for i, _ in batch]
            try:
                results, seconds = await loop.run_in_executor(self.executor, self._timed, items)
                if len(results) != len(items):
                    raise RuntimeError(f"{self.name}: batch function returned {len(results)} results "
                                       f"for {len(items)} items")
            except Exception as err:  # fail this batch only; the loop keeps serving
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            self.stats.record(len(items), seconds)
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)
