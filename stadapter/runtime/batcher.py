"""Dynamic batching: the jobs of many requests run as one mixed-task forward, in one worker thread that owns the
model.

The worker takes jobs until the batch holds ``max_batch`` clip views or ``max_wait_ms`` passed since the first (a
job is never split: one that would overflow the batch is carried over as the first of the next one), runs one
forward and answers each job. When a batched forward fails, each of its jobs runs alone once, so a bad job fails
alone and a transient failure still gets its answer: no job runs the forward more than twice.

Every job's future is resolved exactly once: with its probabilities, with the exception of its last forward,
with :class:`NotReady` when the worker ends before running it, or cancelled by its request (a timeout) while it
still waited in the queue, in which case the worker skips it. On :meth:`Batcher.stop` new jobs are refused and
the queued ones are finished.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from stadapter.errors import StadapterError

if TYPE_CHECKING:
    from typing import TypeAlias

    from torch import Tensor

    from stadapter.runtime.engine import TaskHandle

    Unit: TypeAlias = tuple[Tensor, TaskHandle]  # (views (V, T, 3, H, W), task)

log = logging.getLogger("stadapter.batcher")


class Predictor(Protocol):
    """What the batcher needs of an engine (:class:`stadapter.runtime.engine.Engine`): one mixed-task forward,
    [(views, task)] -> per unit the class probabilities (C,)."""

    def predict(self, units: Sequence[Unit], /) -> list[Tensor]: ...


class BatchObserver(Protocol):
    """Metrics hooks, called from the worker thread (and ``queued`` also from the submitting one)."""

    def queued(self, depth: int) -> None: ...

    def waited(self, seconds: float) -> None: ...

    def ran(self, seconds: float, clips: int, jobs: int, tasks: int) -> None: ...


class NoObserver:
    """A :class:`BatchObserver` that records nothing."""

    def queued(self, depth: int) -> None:
        pass

    def waited(self, seconds: float) -> None:
        pass

    def ran(self, seconds: float, clips: int, jobs: int, tasks: int) -> None:
        pass


class QueueFull(Exception):
    """The queue holds ``queue_size`` jobs already."""


class NotReady(Exception):
    """The worker is not running: not started yet, shutting down, or ended before it ran the job."""


@dataclass(eq=False)
class Job:
    """One request's clip views for its tasks; ``future`` gets one probability tensor (C,) per unit."""

    units: list[Unit]
    future: Future[list[Tensor]] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        """Clip views in the job (what ``max_batch`` counts)."""
        return sum(int(views.shape[0]) for views, _ in self.units)

    def cancel(self) -> bool:
        """Give up on the job (its request timed out). True when the worker had not taken it yet and will
        skip it; False when it already runs (its answer is then dropped)."""
        return self.future.cancel()


class Batcher:
    """Dynamic batching in one thread that owns the model."""

    def __init__(self, engine: Predictor, max_batch: int = 16, max_wait_ms: float = 5.0, queue_size: int = 64,
                 observer: BatchObserver | None = None) -> None:
        self.engine = engine
        self.max_batch, self.max_wait_s, self.queue_size = max_batch, max_wait_ms / 1000, queue_size
        self.observer: BatchObserver = observer or NoObserver()
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # orders submit() against stop() and the worker's end
        self._accepting = False
        self._thread = threading.Thread(target=self._run, name="stadapter-batcher", daemon=True)
        self._carry: Job | None = None  # taken from the queue, first of the next batch

    @property
    def ready(self) -> bool:
        return self._accepting and self._thread.is_alive()

    def start(self) -> None:
        self._accepting = True
        self._thread.start()

    def queue_full(self) -> QueueFull:
        """The error a request gets when the queue has no room."""
        return QueueFull(f"the queue is full ({self.queue_size} requests waiting); retry later")

    def submit(self, job: Job) -> Future[list[Tensor]]:
        """Queue ``job``; its future is answered by the worker. Raises NotReady or QueueFull."""
        with self._lock:
            if not self.ready:
                raise NotReady("the server is not accepting work (starting or shutting down)")
            try:
                self.queue.put_nowait(job)
            except queue.Full:
                raise self.queue_full() from None
        self.observer.queued(self.queue.qsize())
        return job.future

    def stop(self, timeout: float | None = 60.0) -> None:
        """Refuse new work, finish every queued job, then end the thread (waiting up to ``timeout`` s)."""
        with self._lock:
            self._accepting = False
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._drain()

    # -- the worker ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        batch: list[Job] | None = None
        try:
            while (batch := self._gather()) is not None:
                try:
                    self._process(batch)
                except Exception:  # a bug outside the forward: answer the batch and keep serving
                    log.exception("the batcher failed outside the forward")
                    _settle(batch, lambda: RuntimeError("the batcher failed outside the forward"))
        finally:  # also on BaseException: nothing may wait forever on a worker that is gone
            with self._lock:
                self._accepting = False
            _settle(batch or [], lambda: NotReady("the server's worker stopped while running this request"))
            self._drain()

    def _gather(self) -> list[Job] | None:
        """The next batch (its jobs claimed), or None once stopped with nothing queued. A failure while
        gathering answers the jobs claimed so far before it propagates."""
        claimed: list[Job] = []
        try:
            return self._gather_into(claimed)
        except BaseException:
            _settle(claimed, lambda: NotReady("the server's worker stopped while batching this request"))
            raise

    def _gather_into(self, batch: list[Job]) -> list[Job] | None:
        first = self._next(0.05)
        while first is None:
            if self._stop.is_set() and self.queue.empty():
                return None
            first = self._next(0.05)
        batch.append(first)
        size = first.size
        deadline = time.perf_counter() + self.max_wait_s
        while size < self.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0 and self.queue.empty():
                break
            job = self._next(max(left, 0))
            if job is None:
                break
            batch.append(job)  # claimed: in the batch before anything about it is read
            if size + job.size > self.max_batch:
                self._carry = batch.pop()
                break
            size += job.size
        return batch

    def _next(self, timeout: float) -> Job | None:
        """The carried-over job, else the next queued job its request has not cancelled (waiting up to
        ``timeout`` s). Taking a job claims its future: from then on it cannot be cancelled."""
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        deadline = time.perf_counter() + timeout
        while True:
            try:
                job = self.queue.get(timeout=max(deadline - time.perf_counter(), 0))
            except queue.Empty:
                return None
            if job.future.set_running_or_notify_cancel():
                return job

    def _process(self, batch: list[Job]) -> None:
        self.observer.queued(self.queue.qsize())
        now = time.perf_counter()
        for job in batch:
            self.observer.waited(now - job.enqueued)
        try:
            probs = self._forward(batch)
        except Exception as e:  # isolate the failing job(s): each runs alone once
            log.warning("a forward of %d request(s) failed (%s: %s); running each alone", len(batch),
                        type(e).__name__, e, exc_info=not isinstance(e, StadapterError))
            for job in batch:
                self._run_alone(job)
            return
        k = 0
        for job in batch:
            n = len(job.units)
            job.future.set_result(probs[k:k + n])
            k += n

    def _run_alone(self, job: Job) -> None:
        try:
            probs = self._forward([job])
        except Exception as e:  # noqa: BLE001 - handed to the request, which answers and logs it
            job.future.set_exception(e)
        else:
            job.future.set_result(probs)

    def _forward(self, batch: list[Job]) -> list[Tensor]:
        units = [u for job in batch for u in job.units]
        t0 = time.perf_counter()
        probs = self.engine.predict(units)
        seconds = time.perf_counter() - t0
        if len(probs) != len(units):
            raise RuntimeError(f"the engine answered {len(probs)} of {len(units)} requests")
        self.observer.ran(seconds, clips=sum(job.size for job in batch), jobs=len(batch),
                          tasks=len({h.key for _, h in units}))
        return probs

    def _drain(self) -> None:
        """Answer NotReady to every job the worker will not run: carried over, or still queued."""
        def error() -> NotReady:
            return NotReady("the server shut down before this request ran")

        carry, self._carry = self._carry, None
        _settle([carry] if carry is not None else [], error)
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error())


def _settle(jobs: Sequence[Job], error: Callable[[], BaseException]) -> None:
    """Fail the claimed jobs not answered yet (only the worker answers claimed jobs, so this cannot race)."""
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(error())


__all__ = ["Batcher", "BatchObserver", "Job", "NoObserver", "NotReady", "Predictor", "QueueFull"]
