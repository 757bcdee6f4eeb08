"""A bounded work queue whose jobs are batched on the device by a short window.

Requests arrive one image (or a few) at a time; the model is much cheaper per image in a batch.
:class:`Batcher` keeps one worker thread: the first waiting job opens a window of ``window``
seconds, and every job that arrives within it with the same key (the same map settings) joins its
batch, up to ``max_batch`` images. The queue holds at most ``max_queue`` images waiting; past that
:meth:`Batcher.submit` raises :class:`QueueFull` with a retry estimate, so the server answers 503
with ``Retry-After`` instead of growing without limit.

Pure Python, no model: the work itself is the ``run`` callable given to :class:`Batcher`.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

#: a job's states; ``done``, ``failed`` and ``cancelled`` are final
STATES = ("queued", "running", "done", "failed", "cancelled")


class QueueFull(Exception):
    """The queue holds as many images as it may; ``retry_after`` is a whole-seconds estimate of
    when there will be room."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy (its work queue is full); retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    """One request's work.

    Attributes:
        key: jobs of one key may share a batch (their settings are the same).
        items: the work items (image files), in order.
        payload: the request's settings, given to the ``run`` callable.
        state: one of :data:`STATES`.
        done: items finished so far (progress).
        result, error: what ``run`` left (error: an exception), once final.
        on_finish: called once (in the worker thread, or the cancelling thread) when the job
            reaches a final state.
    """

    key: Hashable
    items: list
    payload: Any = None
    on_finish: Callable[[Job], None] | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = "queued"
    done: int = 0
    result: Any = None
    error: BaseException | None = None
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    _event: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def cancelled(self) -> bool:
        return self.state == "cancelled"

    @property
    def final(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is final (True) or ``timeout`` seconds pass (False)."""
        return self._event.wait(timeout)

    def _finish(self, state: str) -> None:
        self.state, self.finished = state, time.monotonic()
        self._event.set()
        if self.on_finish is not None:
            self.on_finish(self)


class Batcher:
    """One worker thread running batches of jobs, from a bounded queue.

    Args:
        run: ``run(jobs)`` computes a batch of jobs sharing a key (called in the worker thread);
            it sets each job's ``result`` (and may advance ``done``, and should stop early when
            every job is ``cancelled``). An exception fails every job of the batch.
        max_queue: most images waiting (not running) at once.
        window: seconds the first waiting job waits for others to join its batch.
        max_batch: most images in one batch (a larger job runs alone, whole).
    """

    def __init__(self, run: Callable[[list[Job]], None], *, max_queue: int = 64, window: float = 0.02, max_batch: int = 16):
        if max_queue < 1 or max_batch < 1 or not window >= 0:
            raise ValueError("max_queue and max_batch must be >= 1 and window >= 0")
        self._run, self.max_queue, self.window, self.max_batch = run, max_queue, window, max_batch
        self._pending: list[Job] = []
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._batch_seconds = 1.0  # a running estimate of one batch's time, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="weakloc-batcher", daemon=True)
        self._thread.start()

    # --- the request side ---------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        """Queue ``job``; :class:`QueueFull` when its images would not fit."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            waiting = sum(len(j.items) for j in self._pending)
            if waiting and waiting + len(job.items) > self.max_queue or len(job.items) > self.max_queue:
                batches_ahead = math.ceil(waiting / self.max_batch) + (1 if self._running else 0)
                raise QueueFull(max(1, math.ceil(batches_ahead * self._batch_seconds)))
            job.submitted = time.monotonic()
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def position(self, job: Job) -> int:
        """Images queued ahead of ``job`` (0 once it runs)."""
        with self._cond:
            ahead = 0
            for j in self._pending:
                if j is job:
                    return ahead
                ahead += len(j.items)
            return 0

    def cancel(self, job: Job) -> bool:
        """Cancel ``job``: a queued one leaves the queue at once; a running one is marked, and
        ``run`` stops at its next check (its result is dropped). False when already final."""
        with self._cond:
            if job.final:
                return False
            if job in self._pending:
                self._pending.remove(job)
            else:
                job.state = "cancelled"  # the worker finishes it
                return True
        job._finish("cancelled")
        return True

    def stats(self) -> dict:
        """``queued`` images, ``running`` images, ``max_queue``."""
        with self._cond:
            return {"queued": sum(len(j.items) for j in self._pending), "running": sum(len(j.items) for j in self._running),
                    "max_queue": self.max_queue}

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking work; queued jobs are cancelled, a running batch finishes."""
        with self._cond:
            self._closed = True
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for job in pending:
            job._finish("cancelled")
        self._thread.join(timeout)

    # --- the worker -----------------------------------------------------------------------------

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job and the jobs of its key that arrive within its window."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            while True:
                first = self._pending[0]
                group, size = [], 0
                for j in self._pending:
                    if j.key == first.key and (not group or size + len(j.items) <= self.max_batch):
                        group.append(j)
                        size += len(j.items)
                left = first.submitted + self.window - time.monotonic()
                if size >= self.max_batch or left <= 0 or self._closed:
                    break
                self._cond.wait(left)
                if not self._pending:  # all cancelled meanwhile
                    return []
            for j in group:
                self._pending.remove(j)
                j.state, j.started = "running", time.monotonic()
            self._running = group
            return group

    def _loop(self) -> None:
        while True:
            group = self._take()
            if group is None:
                return
            if not group:
                continue
            t0 = time.monotonic()
            error = None
            try:
                self._run(group)
            except BaseException as e:  # noqa: BLE001 -- the jobs carry it to their requests
                error = e
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.monotonic() - t0)
            with self._cond:  # decided under the lock, so a cancel either lands before or not at all
                self._running = []
                ends = ["cancelled" if job.state == "cancelled" else "failed" if error is not None else "done" for job in group]
                for job, end in zip(group, ends):
                    job.state = end
            for job, end in zip(group, ends):
                if end == "cancelled":
                    job.result = None
                elif end == "failed":
                    job.error = error
                else:
                    job.done = len(job.items)
                job._finish(end)
