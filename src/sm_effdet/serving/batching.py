"""Dynamic batching: images of concurrent requests go through the network together.

A request's prepared images wait in a bounded queue; one worker takes the first waiting
request, keeps taking more for at most `wait_ms` or until `max_batch` images are gathered, runs
them as one batch on the model thread, and hands each request its rows. A full queue is
refused at once (503), so overload never grows memory without bound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .decoding import ClientError


def model_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread on which the server runs torch: loading, the warm-up and every batch.

    The network uses every core itself (intra-op threads), and one batch at a time is what the
    cores can do. It must be one thread for all of it: each thread that runs torch gets its own
    team of OpenMP threads, and once libgomp manages more threads than there are cores it stops
    spinning between parallel regions. EfficientDet runs hundreds of small ones per image, so a
    warm-up on another thread made every later request about twice as slow (measured on 2 cores:
    the network at batch 1 took 35 ms with all torch on one thread, 89 ms after a second thread
    had run it; docs/performance.md).
    """
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")


@dataclass
class _Job:
    images: list[Any]
    sizes: list[Any]
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    def __init__(self, run: Callable[[list[Any], list[Any]], list[Any]], max_batch: int,
                 wait_ms: float, max_queue_images: int,
                 thread: concurrent.futures.ThreadPoolExecutor) -> None:
        self.run = run  # (images, sizes) -> one result per image, called on the model thread
        self.max_batch = max_batch
        self.wait = wait_ms / 1000
        self.max_queue_images = max_queue_images
        self.queued_images = 0
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        # The server's one thread for torch (model_thread() above), shut down by stop().
        self._model_thread = thread
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._model_thread.shutdown(wait=True)

    async def predict(self, images: list[Any], sizes: list[Any]) -> list[Any]:
        if self.queued_images + len(images) > self.max_queue_images:
            raise ClientError(
                503, f"the server is busy ({self.queued_images} images are waiting); retry shortly."
            )
        job = _Job(images, sizes)
        self.queued_images += len(images)
        self._queue.put_nowait(job)
        return await job.future

    async def _gather(self) -> list[_Job]:
        jobs = [await self._queue.get()]
        count = len(jobs[0].images)
        deadline = time.monotonic() + self.wait
        while count < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self._queue.get(), remaining)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            jobs.append(job)
            count += len(job.images)
        return jobs

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._gather()
            images = [image for job in jobs for image in job.images]
            sizes = [size for job in jobs for size in job.sizes]
            try:
                results = []
                for start in range(0, len(images), self.max_batch):
                    end = start + self.max_batch
                    results += await loop.run_in_executor(self._model_thread, self.run, images[start:end], sizes[start:end])
            except Exception as exc:  # the model failed: every waiting request hears why
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
            else:
                offset = 0
                for job in jobs:
                    if not job.future.done():
                        job.future.set_result(results[offset : offset + len(job.images)])
                    offset += len(job.images)
            finally:
                self.queued_images -= len(images)
