"""The dynamic batcher over a fake engine that fails on chosen batches: failure isolation, exactly one answer per
job, at most two forwards per job, cancelled jobs skipped, and shutdown with jobs waiting."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import pytest
import torch

from stadapter.errors import InputError
from stadapter.runtime.batcher import Batcher, Job, NotReady, QueueFull

pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class FakeTask:
    key: str


class CountingFuture(Future):
    """A future that counts how often it is answered (the batcher must answer each exactly once)."""

    def __init__(self) -> None:
        super().__init__()
        self.answers = 0

    def set_result(self, result) -> None:
        self.answers += 1
        super().set_result(result)

    def set_exception(self, exception) -> None:
        self.answers += 1
        super().set_exception(exception)


class FakeEngine:
    """``predict`` answers each unit with its views' first value (the job's id), or raises ``fails(call, ids)``'s
    exception for the batch. Records the job ids of every forward."""

    def __init__(self, fails: Callable[[int, list[int]], BaseException | None] = lambda call, ids: None,
                 gate: threading.Event | None = None) -> None:
        self.fails, self.gate = fails, gate
        self.calls: list[list[int]] = []
        self.entered = threading.Event()

    def predict(self, units: Sequence[tuple[torch.Tensor, FakeTask]], /) -> list[torch.Tensor]:
        ids = [int(views.flatten()[0]) for views, _ in units]
        self.calls.append(ids)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        error = self.fails(len(self.calls), ids)
        if error is not None:
            raise error
        return [views.flatten()[:1].clone() for views, _ in units]

    def forwards(self) -> Counter[int]:
        """How many forwards each job id took part in."""
        return Counter(i for ids in self.calls for i in ids)


def job(i: int, views: int = 1) -> Job:
    return Job([(torch.full((views, 1), float(i)), FakeTask(f"task{i % 3}"))], future=CountingFuture())


@pytest.fixture
def started():
    batchers: list[Batcher] = []

    def start(engine: FakeEngine, **kw) -> Batcher:
        b = Batcher(engine, **{"max_batch": 4, "max_wait_ms": 2000, **kw})
        b.start()
        batchers.append(b)
        return b

    yield start
    for b in batchers:
        b.stop(10)


def answers(jobs: list[Job], timeout: float = 20) -> list[object]:
    """Each job's result or exception, failing (not hanging) when one is never answered."""
    out: list[object] = []
    for j in jobs:
        e = j.future.exception(timeout)
        out.append(e if e is not None else j.future.result())
    return out


def assert_answered_once(jobs: list[Job]) -> None:
    for j in jobs:
        assert j.future.done() and j.future.answers == 1, (j, j.future.answers)


def test_one_bad_job_in_a_batch_of_many_fails_alone(started):
    engine = FakeEngine(lambda call, ids: InputError("bad clip") if 2 in ids else None)
    b = started(engine)
    jobs = [job(i) for i in range(4)]  # 4 views: exactly one batch of max_batch
    for j in jobs:
        b.submit(j)
    got = answers(jobs)
    assert isinstance(got[2], InputError) and str(got[2]) == "bad clip"
    for i in (0, 1, 3):
        assert torch.equal(got[i][0], torch.tensor([float(i)])), got[i]
    assert engine.calls[0] == [0, 1, 2, 3], "the four jobs ran as one batch first"
    assert sorted(engine.calls[1:]) == [[0], [1], [2], [3]], "then each job alone, once"
    assert max(engine.forwards().values()) == 2
    assert_answered_once(jobs)


def test_a_transient_failure_gets_the_result_not_a_hang(started):
    engine = FakeEngine(lambda call, ids: RuntimeError("CUDA hiccup") if call == 1 else None)
    b = started(engine, max_wait_ms=0)
    (only,) = jobs = [job(7, views=2)]
    b.submit(only)
    (got,) = answers(jobs)
    assert torch.equal(got[0], torch.tensor([7.0])), got
    assert engine.calls == [[7], [7]]
    assert_answered_once(jobs)


def test_a_transient_failure_of_a_batch_answers_every_job(started):
    engine = FakeEngine(lambda call, ids: RuntimeError("transient") if call == 1 else None)
    b = started(engine)
    jobs = [job(i, views=2) for i in range(2)]
    for j in jobs:
        b.submit(j)
    got = answers(jobs)
    assert [float(g[0]) for g in got] == [0.0, 1.0]
    assert engine.calls == [[0, 1], [0], [1]]
    assert_answered_once(jobs)


def test_when_every_job_fails_each_gets_its_exception_after_at_most_two_forwards(started):
    engine = FakeEngine(lambda call, ids: ValueError(f"forward {call} failed"))
    b = started(engine)
    jobs = [job(i) for i in range(4)]
    for j in jobs:
        b.submit(j)
    got = answers(jobs)
    assert all(isinstance(e, ValueError) for e in got), got
    assert len({str(e) for e in got}) == 4, "each job gets the error of its own (second) forward"
    assert engine.forwards() == {0: 2, 1: 2, 2: 2, 3: 2}
    assert len(engine.calls) == 5
    assert_answered_once(jobs)


def test_a_job_that_always_fails_runs_the_forward_twice_at_most(started):
    engine = FakeEngine(lambda call, ids: RuntimeError("broken") if 5 in ids else None)
    b = started(engine, max_batch=1, max_wait_ms=0)
    jobs = [job(5), job(6), job(5)]
    for j in jobs:
        b.submit(j)
    got = answers(jobs)
    assert isinstance(got[0], RuntimeError) and isinstance(got[2], RuntimeError)
    assert float(got[1][0]) == 6.0
    assert [len(c) for c in engine.calls] == [1] * 5 and engine.forwards() == {5: 4, 6: 1}
    assert_answered_once(jobs)


def test_a_job_larger_than_the_room_left_is_carried_to_the_next_batch(started):
    engine = FakeEngine()
    b = started(engine)
    jobs = [job(0, views=3), job(1, views=2), job(2, views=2)]
    for j in jobs:
        b.submit(j)
    assert [float(g[0]) for g in answers(jobs)] == [0.0, 1.0, 2.0]
    assert engine.calls == [[0], [1, 2]]
    assert_answered_once(jobs)


def test_a_cancelled_job_is_skipped_and_the_others_answered(started):
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    b = started(engine, max_batch=1, max_wait_ms=0)
    first, dropped, last = job(0), job(1), job(2)
    b.submit(first)
    assert engine.entered.wait(10)  # the worker holds the first job in its forward
    b.submit(dropped)
    b.submit(last)
    assert dropped.cancel(), "a queued job can be cancelled"
    assert not first.cancel(), "a running job cannot"
    gate.set()
    assert [float(g[0]) for g in answers([first, last])] == [0.0, 2.0]
    assert dropped.future.cancelled() and dropped.future.answers == 0
    assert engine.calls == [[0], [2]], "the cancelled job never reached the forward"


def test_shutdown_finishes_the_queued_jobs(started):
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    b = started(engine, max_batch=1, max_wait_ms=0)
    jobs = [job(i) for i in range(5)]
    for j in jobs:
        b.submit(j)
    assert engine.entered.wait(10)
    stopper = threading.Thread(target=b.stop, args=(30,))
    stopper.start()
    deadline = time.monotonic() + 10
    while b.ready:  # stop() refuses new work at once
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(NotReady):
        b.submit(job(9))
    gate.set()
    stopper.join(30)
    assert not stopper.is_alive()
    assert [float(g[0]) for g in answers(jobs)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert_answered_once(jobs)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the SystemExit, on purpose
def test_jobs_still_waiting_when_the_worker_ends_get_not_ready(started):
    gate = threading.Event()
    engine = FakeEngine(lambda call, ids: SystemExit("the worker thread dies"), gate=gate)
    b = started(engine, max_batch=1, max_wait_ms=0, queue_size=8)
    jobs = [job(i) for i in range(4)]
    for j in jobs:
        b.submit(j)
    assert engine.entered.wait(10)
    gate.set()
    got = answers(jobs)
    assert all(isinstance(e, NotReady) for e in got), got
    assert engine.calls == [[0]], "the worker ended in the first forward; the others never ran"
    assert_answered_once(jobs)
    assert not b.ready
    with pytest.raises(NotReady):
        b.submit(job(9))


def test_submit_before_start_and_on_a_full_queue():
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    b = Batcher(engine, max_batch=1, max_wait_ms=0, queue_size=1)
    with pytest.raises(NotReady):
        b.submit(job(0))
    b.start()
    try:
        b.submit(job(0))
        assert engine.entered.wait(10)  # the worker took job 0: the queue is empty again
        b.submit(job(1))
        with pytest.raises(QueueFull, match="queue is full"):
            b.submit(job(2))
    finally:
        gate.set()
        b.stop(10)


class BrokenViews:
    """Views whose shape cannot be read: gathering a batch with this job fails outside the forward."""

    @property
    def shape(self) -> tuple[int, ...]:
        raise RuntimeError("broken views")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the worker dies, on purpose
def test_a_failure_while_gathering_answers_every_claimed_job(started):
    engine = FakeEngine()
    b = started(engine, max_wait_ms=500)
    good = job(1)
    bad = Job([(BrokenViews(), FakeTask("task0"))], future=CountingFuture())  # type: ignore[list-item]
    b.submit(good)
    b.submit(bad)
    results = answers([good, bad])
    assert all(isinstance(r, (NotReady, torch.Tensor, list)) for r in results)
    assert isinstance(results[1], NotReady)
    assert_answered_once([good, bad])
    assert not b.ready  # the worker is gone, and says so instead of leaving requests waiting
