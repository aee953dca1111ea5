"""The server's two queues on the event loop: chat requests batched for the model thread (:class:`Batcher`),
and appends committed together (:class:`AppendWriter`)."""

from __future__ import annotations

import asyncio

from starlette.concurrency import run_in_threadpool

from userllm.serve.engine import Engine
from userllm.serve.jobs import Job
from userllm.serve.protocol import ServeConfig


class Batcher:
    """Collects chat jobs and hands them to the engine's thread in batches."""

    def __init__(self, engine: Engine, cfg: ServeConfig) -> None:
        self.engine, self.cfg = engine, cfg
        self.queue: asyncio.Queue[Job] = asyncio.Queue()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.cfg.max_wait_ms / 1000
            while len(batch) < self.cfg.max_batch:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            await loop.run_in_executor(self.engine.executor, self.engine.run_batch, batch)


class AppendWriter:
    """Commits concurrent appends together: each request waits for the transaction that holds its events
    (one commit, one fsync, for every append that arrived while the previous one was being written), and is
    acknowledged only after that commit."""

    def __init__(self, engine: Engine, max_group: int = 256) -> None:
        self.engine, self.max_group = engine, max_group
        self.queue: asyncio.Queue[tuple[str, list[dict], asyncio.Future]] = asyncio.Queue()

    async def append(self, user_id: str, rows: list[dict]) -> int:
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((user_id, rows, done))
        return await done

    async def run(self) -> None:
        while True:
            group = [await self.queue.get()]
            while len(group) < self.max_group and not self.queue.empty():
                group.append(self.queue.get_nowait())
            try:
                counts = await run_in_threadpool(self.engine.store.append_many, [(u, rows) for u, rows, _ in group])
            except Exception as e:  # noqa: BLE001 - every request of the group gets the error, none is acknowledged
                for *_, done in group:
                    if not done.done():
                        done.set_exception(e)
                continue
            for (_, _, done), count in zip(group, counts):
                if not done.done():
                    done.set_result(count)
