"""The engine thread behind asyncio callers: concurrent requests, cancellation, overload, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from leapllm.config import EngineConfig
from leapllm.engine.async_engine import (
    AsyncEngine,
    EngineOverloadedError,
    EngineStepError,
    EngineStoppedError,
)
from leapllm.engine.llm_engine import LLMEngine
from leapllm.engine.sampling import SamplingParams
from leapllm.errors import InvalidRequestError


def make_engine(llm, **kw) -> AsyncEngine:
    max_waiting = kw.pop("max_waiting", 64)
    return AsyncEngine(LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=128, **kw)), max_waiting=max_waiting)


async def collect(engine, request_id, ids, params, stop_after=None):
    outs = []
    async for out in engine.generate(request_id, ids, params):
        outs.append(out)
        if stop_after is not None and len(outs) >= stop_after:
            break
    return outs


async def wait_idle(engine: AsyncEngine) -> None:
    for _ in range(200):
        s = engine.stats()
        if s["kv_blocks_used"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine did not go idle: {engine.stats()}")


def test_concurrent_requests_with_early_exits_all_end_and_free_the_pool(llm):
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = llm.run(llm.encode("The weather today is"), greedy).token_ids

    async def main():
        engine = make_engine(llm, max_num_seqs=8)
        engine.start()
        ids = llm.encode("The weather today is")
        tasks = [collect(engine, f"r{i}", ids, greedy, stop_after=3 if i % 3 == 0 else None) for i in range(12)]
        results = await asyncio.gather(*tasks)
        await wait_idle(engine)
        await engine.shutdown(grace_s=1)
        return results

    results = asyncio.run(main())
    for i, outs in enumerate(results):
        toks = [t for o in outs for t in o.new_token_ids]
        if i % 3 == 0:
            assert len(outs) == 3 and not outs[-1].finished  # left early: the engine aborted it
        else:
            assert toks == expected and outs[-1].finish_reason == "length"


def test_cancelling_a_waiting_task_aborts_its_request(llm):
    async def main():
        engine = make_engine(llm, max_num_seqs=1)
        engine.start()
        params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
        task = asyncio.create_task(collect(engine, "long", llm.encode("Count: 1, 2, 3,"), params))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(engine)
        assert engine.num_unfinished == 0
        await engine.shutdown(grace_s=1)

    asyncio.run(main())


def test_bad_request_fails_alone_at_once(llm):
    async def main():
        engine = make_engine(llm)
        engine.start()
        good = asyncio.create_task(collect(engine, "good", llm.encode("Hello"), SamplingParams(max_tokens=4)))
        with pytest.raises(InvalidRequestError):
            await collect(engine, "bad", [], SamplingParams(max_tokens=4))
        outs = await good
        await engine.shutdown(grace_s=1)
        return outs

    assert asyncio.run(main())[-1].finished


def test_over_the_queue_limit_is_refused_immediately(llm):
    async def main():
        engine = make_engine(llm, max_num_seqs=1, max_waiting=0)
        engine.start()
        params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
        running = asyncio.create_task(collect(engine, "a", llm.encode("Hello"), params))
        await asyncio.sleep(0.05)
        with pytest.raises(EngineOverloadedError):
            await collect(engine, "b", llm.encode("Hello"), params)
        await running
        await engine.shutdown(grace_s=1)

    asyncio.run(main())


def test_shutdown_aborts_what_outlives_the_grace_period_and_refuses_new_requests(llm):
    async def main():
        engine = make_engine(llm)
        engine.start()
        params = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)
        task = asyncio.create_task(collect(engine, "endless", llm.encode("Once"), params))
        await asyncio.sleep(0.3)
        await engine.shutdown(grace_s=0.2)
        outs = await task
        with pytest.raises(EngineStoppedError):
            await collect(engine, "late", llm.encode("Once"), params)
        return outs, engine

    outs, engine = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert engine.engine.allocator.num_used == 0


def test_a_dead_engine_thread_fails_requests_in_flight_and_refuses_new_ones(llm):
    async def main():
        engine = make_engine(llm)
        engine.start()

        def broken(*_args, **_kw):
            raise RuntimeError("simulated bug outside a step")

        engine.engine.has_unfinished = broken  # the thread dies on its next command
        with pytest.raises(EngineStepError, match="simulated bug"):
            await collect(engine, "a", llm.encode("Hello"), SamplingParams(max_tokens=4))
        assert engine.dead is not None
        with pytest.raises(EngineStoppedError):
            await collect(engine, "b", llm.encode("Hello"), SamplingParams(max_tokens=4))

    asyncio.run(main())
