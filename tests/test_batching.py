"""The replica's batcher (pure asyncio: no Ray, no HTTP)."""

import asyncio

import pytest

from actors.batching import Batcher


def test_a_batch_is_formed_once_the_previous_one_is_done_from_all_that_waits():
    async def scenario() -> tuple[list[int], list[int]]:
        release, sizes = asyncio.Event(), []

        async def run(items: list[int]) -> list[int]:
            sizes.append(len(items))
            if len(sizes) == 1:
                await release.wait()  # the model is busy with the first batch while the others arrive
            return [item * 10 for item in items]

        batcher = Batcher(run, max_size=4, wait_s=0.0)
        first = asyncio.create_task(batcher.submit(0))
        while not sizes:
            await asyncio.sleep(0)
        rest = [asyncio.create_task(batcher.submit(item)) for item in range(1, 7)]
        await asyncio.sleep(0)  # each submit queues its item
        release.set()
        return list(await asyncio.gather(first, *rest)), sizes

    results, sizes = asyncio.run(scenario())
    assert results == [0, 10, 20, 30, 40, 50, 60]
    assert sizes == [1, 4, 2]  # not six batches of one, formed while the first ran


def test_a_failed_batch_fails_its_items_and_the_next_batch_runs():
    async def scenario() -> tuple[BaseException | int, ...]:
        async def run(items: list[int]) -> list[int]:
            if 0 in items:
                raise RuntimeError("the model failed")
            return items

        batcher = Batcher(run, max_size=2, wait_s=0.0)
        failed = await asyncio.gather(batcher.submit(0), return_exceptions=True)
        return (*failed, await batcher.submit(5))

    failed, served = asyncio.run(scenario())
    assert isinstance(failed, RuntimeError) and served == 5


def test_the_first_batch_waits_up_to_wait_s_to_fill():
    async def scenario() -> list[int]:
        sizes: list[int] = []

        async def run(items: list[int]) -> list[int]:
            sizes.append(len(items))
            return items

        batcher = Batcher(run, max_size=3, wait_s=60.0)  # full long before the wait is over
        first = asyncio.create_task(batcher.submit(0))
        for _ in range(5):
            await asyncio.sleep(0)  # the batcher has the first item and waits for more
        await asyncio.gather(first, batcher.submit(1), batcher.submit(2))
        return sizes

    assert asyncio.run(scenario()) == [3]  # with wait_s=0: [1, 2]


@pytest.mark.parametrize("max_size", [1, 2])
def test_no_batch_exceeds_max_size(max_size):
    async def scenario() -> list[int]:
        sizes: list[int] = []

        async def run(items: list[int]) -> list[int]:
            sizes.append(len(items))
            return items

        batcher = Batcher(run, max_size=max_size, wait_s=0.0)
        await asyncio.gather(*(batcher.submit(item) for item in range(5)))
        return sizes

    sizes = asyncio.run(scenario())
    assert sum(sizes) == 5 and max(sizes) <= max_size
