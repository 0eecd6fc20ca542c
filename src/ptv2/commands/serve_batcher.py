"""The micro-batcher: concurrent requests for any mix of prompts coalesce into one batch, run on one worker thread.

The first request of a batch waits at most `max_wait` seconds (counted from its arrival) for others; a batch closes
earlier once it holds `max_batch` examples. While the worker runs a batch the event loop keeps accepting requests,
which form the next one. Loading and unloading prompts run on the same worker thread, between two batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from ptv2.commands.serve_pool import PromptPool, Request, RequestError

log = logging.getLogger("ptv2")


class MicroBatcher:
    def __init__(self, pool: PromptPool, max_batch: int, max_wait: float, on_batch=None):
        """on_batch(rows, seconds): called after every batch (the metrics)."""
        self.pool, self.max_batch, self.max_wait, self.on_batch = pool, max_batch, max_wait, on_batch
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="ptv2-serve-worker")
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._batches())

    async def stop(self) -> None:
        """Answer what is queued, then stop (the server calls this once no request is in flight)."""
        if self.task is not None:
            await self.queue.put(None)
            await self.task
        self.worker.shutdown(wait=True)

    async def submit(self, request: Request) -> Request:
        """The request with its answers or its error, once its batch ran."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((time.monotonic(), request, future))
        return await future

    async def call(self, function, *args):
        """function(*args) on the worker thread, between two batches (loading and unloading prompts)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, function, *args)

    async def _batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self.queue.get()
            if item is None:
                return
            batch, rows, stopping = [item], item[1].rows, False
            deadline = item[0] + self.max_wait
            while rows < self.max_batch:
                try:
                    if self.queue.empty():
                        waited = deadline - time.monotonic()
                        if waited <= 0:
                            break
                        following = await asyncio.wait_for(self.queue.get(), waited)
                    else:
                        following = self.queue.get_nowait()
                except TimeoutError:
                    break
                if following is None:
                    stopping = True
                    break
                batch.append(following)
                rows += following[1].rows
            await self._run(loop, batch, rows)
            if stopping:
                return

    async def _run(self, loop, batch: list, rows: int) -> None:
        started = time.monotonic()
        requests = [request for _, request, _ in batch]
        try:
            await loop.run_in_executor(self.worker, self.pool.run, requests)
        except Exception:  # a fault of the server, not of a request: logged with its traceback, answered as such
            log.exception("a batch of %d requests failed", len(requests))
            for request in requests:
                request.error = request.error or RequestError("internal error; the server's log has the details", 500)
        if self.on_batch is not None:
            self.on_batch(rows, time.monotonic() - started)
        for _, request, future in batch:
            if not future.done():  # a client that went away cancelled its own future
                future.set_result(request)
