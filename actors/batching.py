"""A replica's batcher: requests' images gathered into batches that are formed only when the model is free.

Ray Serve's `@serve.batch` forms the next batch as soon as the previous one starts (it then waits for its turn),
so under load a queue of many images runs as batches of the one or two that came within `batch_wait_timeout_s`:
the replica loses the batch's speed-up exactly when it needs it. Here a batch is formed once the previous one is
done, from everything waiting (up to `max_size`), after waiting at most `wait_s` for the first batch to fill.
"""

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    def __init__(self, run: Callable[[list[T]], Awaitable[list[R]]], max_size: int, wait_s: float) -> None:
        self.run, self.max_size, self.wait_s = run, max_size, wait_s
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """The item's result, once the batch it joined has run (its exception, if the batch raised)."""
        if self._worker is None or self._worker.done():  # started in the replica's own event loop
            self._worker = asyncio.create_task(self._work())
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _next_batch(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(batch) < self.max_size:
            if self._queue.empty():
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                continue
            batch.append(self._queue.get_nowait())
        return [(item, future) for item, future in batch if not future.done()]  # a request cancelled meanwhile

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                results = await self.run([item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - each request of the batch answers it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
