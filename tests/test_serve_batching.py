"""serve.batching.Batcher on a real event loop: batches form when the model is free, sized by images, with a timer
only while the model is idle; errors and cancellations stay with their own callers."""

from __future__ import annotations

import asyncio

import pytest

from serve.batching import Batcher


class Model:
    """A batch function that records each batch and, while ``gate`` is closed, holds the batch it runs."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.running = asyncio.Event()

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.running.set()
        await self.gate.wait()
        return [ValueError(f"bad {it}") if str(it).startswith("bad") else f"{it}!" for it in items]


def run(coro):
    async def bounded():
        async with asyncio.timeout(30):  # a batcher that loses an item hangs its caller: fail instead
            return await coro

    return asyncio.run(bounded())


async def queued_while_busy(b: Batcher, model: Model, first, later) -> tuple[asyncio.Task, list[asyncio.Task]]:
    """``first`` submitted and running, held by the model's closed gate; then ``later`` queued behind it."""
    model.gate.clear()
    task = asyncio.create_task(b.submit(first))
    await model.running.wait()  # nothing else was queued, and no timer held it: it runs alone
    rest = [asyncio.create_task(b.submit(k)) for k in later]
    await asyncio.sleep(0)
    return task, rest


def test_batches_form_from_what_queued_while_the_model_ran():
    async def scenario():
        model = Model()
        b = Batcher(model, max_size=3)
        first, rest = await queued_while_busy(b, model, "a", "bcdef")
        model.gate.set()
        return model.batches, await first, await asyncio.gather(*rest), b.stats()

    batches, first, rest, stats = run(scenario())
    assert batches == [["a"], ["b", "c", "d"], ["e", "f"]]
    assert stats == {"batches": 3, "size_total": 6, "size_largest": 3}
    assert first == "a!" and rest == ["b!", "c!", "d!", "e!", "f!"]


def test_size_counts_images_and_an_item_larger_than_the_limit_runs_alone():
    async def scenario():
        model = Model()
        b = Batcher(model, max_size=4, size=len)
        first, rest = await queued_while_busy(b, model, "x", ("yy", "zz", "www", "vvvvvv"))
        model.gate.set()
        await asyncio.gather(first, *rest)
        return model.batches

    assert run(scenario()) == [["x"], ["yy", "zz"], ["www"], ["vvvvvv"]]


def test_the_timer_holds_only_an_idle_model_and_a_full_batch_does_not_wait_for_it():
    async def scenario():
        model = Model()
        b = Batcher(model, max_size=2, wait_s=600.0)  # the timer never runs out within the test
        a = asyncio.create_task(b.submit("a"))
        await asyncio.sleep(0.05)  # the model is idle: "a" waits for company, and "b" fills its batch
        full = [await b.submit("b"), await a]
        b.configure(max_size=8, wait_s=0.05)
        alone = await b.submit("c")  # nobody joins: the timer runs out, then the batch of one runs
        return model.batches, full, alone

    batches, full, alone = run(scenario())
    assert batches == [["a", "b"], ["c"]] and full == ["b!", "a!"] and alone == "c!"


def test_an_items_error_reaches_only_its_caller_and_a_failing_batch_fails_only_itself():
    async def scenario():
        model = Model()
        b = Batcher(model, max_size=8, wait_s=0.01)
        mixed = await asyncio.gather(b.submit("ok1"), b.submit("bad"), b.submit("ok2"), return_exceptions=True)

        async def breaks_on_1(items):
            if 1 in items:
                raise RuntimeError("the model broke")
            return [f"{it}!" for it in items]

        b2 = Batcher(breaks_on_1, max_size=8, wait_s=0.01)
        failed = await asyncio.gather(b2.submit(1), b2.submit(2), return_exceptions=True)
        after = await b2.submit("later")  # the loop goes on after a batch that raised
        return mixed, failed, after

    mixed, failed, after = run(scenario())
    assert mixed[0] == "ok1!" and mixed[2] == "ok2!"
    assert isinstance(mixed[1], ValueError) and str(mixed[1]) == "bad bad"
    assert all(isinstance(e, RuntimeError) and str(e) == "the model broke" for e in failed)
    assert after == "later!"


def test_a_caller_cancelled_before_its_batch_formed_is_skipped():
    async def scenario():
        model = Model()
        b = Batcher(model, max_size=8)
        first, (gone, kept) = await queued_while_busy(b, model, "a", ("gone", "kept"))
        gone.cancel()
        model.gate.set()
        return model.batches, await first, await kept, gone.cancelled()

    batches, first, kept, cancelled = run(scenario())
    assert batches == [["a"], ["kept"]] and (first, kept, cancelled) == ("a!", "kept!", True)


@pytest.mark.parametrize("size,wait", [(0, 0.0), (4, -1.0), (4, float("nan")), (4, float("inf"))])
def test_bad_settings_are_refused_naming_what_is_allowed(size, wait):
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1 and batch_wait_timeout_s a finite"):
        Batcher(Model(), max_size=size, wait_s=wait)
