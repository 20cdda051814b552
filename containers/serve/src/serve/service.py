"""Running a request's jobs on the engine: submitted all or none, waited for within the request's timeout,
and engine trouble turned into the HTTP errors it means (429, 503, 424). A caller that hangs up cancels its
generations, so nobody's batch slot goes to an answer nobody reads."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from serve.access_log import Outcome
from serve.errors import GenerationFailed, NotReady, Overloaded, QueueExpired
from serve.generation import (
    EngineStopped,
    Finished,
    GenerationError,
    GenerationHandle,
    QueueFull,
    QueueTimeout,
    Token,
)

if TYPE_CHECKING:
    from serve.adapters import Job
    from serve.predictor import Predictor


def submit_all(jobs: list[Job], predictor: Predictor) -> list[GenerationHandle]:
    """All or nothing: if the queue fills half-way, the queued jobs are cancelled and we answer 429."""
    handles: list[GenerationHandle] = []
    try:
        for job in jobs:
            handles.append(predictor.submit(job.prompt_ids, job.sampling))
    except QueueFull as e:
        for handle in handles:
            handle.cancel()
        raise Overloaded(str(e)) from None
    except EngineStopped as e:
        for handle in handles:
            handle.cancel()
        raise NotReady(str(e)) from None
    return handles


def run(
    jobs: list[Job],
    predictor: Predictor,
    caller_gone: Callable[[], bool] | None = None,
    window: int | None = None,
) -> list[Finished]:
    """Every job's result, in order; a failed generation fails them all (424), one that never left the queue
    before its deadline too (503). Once `caller_gone()` says so, every job is cancelled. With `window`, at most
    that many jobs are queued at once, the next submitted as one finishes (a batch transform's records)."""
    if window is not None and len(jobs) > window:
        return _run_windowed(jobs, predictor, caller_gone, window)
    handles = submit_all(jobs, predictor)

    def gone() -> bool:
        if caller_gone is not None and caller_gone():
            for handle in handles:
                handle.cancel()
            return True
        return False

    try:
        return [
            handle.result(timeout=predictor.config.result_timeout_s, caller_gone=gone if caller_gone else None)
            for handle in handles
        ]
    except GenerationError as e:
        for handle in handles:
            handle.cancel()
        if isinstance(e, QueueTimeout):
            raise QueueExpired(str(e)) from None
        raise GenerationFailed(str(e)) from None


def events(handle: GenerationHandle, predictor: Predictor, outcome: Outcome) -> Iterator[Token | Finished]:
    """A streamed job's events; the last one, the result, goes into the access log's `outcome` too."""
    for event in handle.events(timeout=predictor.config.result_timeout_s):
        if isinstance(event, Finished):
            outcome.record([event])
        yield event


def _run_windowed(
    jobs: list[Job], predictor: Predictor, caller_gone: Callable[[], bool] | None, window: int
) -> list[Finished]:
    results: list[Finished | None] = [None] * len(jobs)
    in_flight: deque[tuple[int, GenerationHandle]] = deque()
    next_job = 0
    give_up_at = time.monotonic() + predictor.config.result_timeout_s
    try:
        while next_job < len(jobs) or in_flight:
            while next_job < len(jobs) and len(in_flight) < window:
                try:
                    handle = predictor.submit(jobs[next_job].prompt_ids, jobs[next_job].sampling)
                except QueueFull as e:
                    if in_flight:
                        break  # others' requests hold the queue: take a result first, then try again
                    if time.monotonic() > give_up_at:
                        raise Overloaded(str(e)) from None
                    time.sleep(0.05)
                    continue
                in_flight.append((next_job, handle))
                next_job += 1
                give_up_at = time.monotonic() + predictor.config.result_timeout_s
            index, handle = in_flight.popleft()
            results[index] = handle.result(timeout=predictor.config.result_timeout_s, caller_gone=caller_gone)
            if handle.cancelled:  # the caller left: the rest are not started
                break
    except EngineStopped as e:
        raise NotReady(str(e)) from None
    except GenerationError as e:
        raise (QueueExpired if isinstance(e, QueueTimeout) else GenerationFailed)(str(e)) from None
    finally:
        for _, handle in in_flight:
            handle.cancel()
    return [r for r in results if r is not None]
