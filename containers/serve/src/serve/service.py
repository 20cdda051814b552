"""Running a request's jobs on the engine: submitted all or none, waited for within the request's timeout,
and engine trouble turned into the HTTP errors it means (429, 503, 424)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from serve.access_log import Outcome
from serve.errors import GenerationFailed, NotReady, Overloaded
from serve.generation import EngineStopped, Finished, GenerationError, GenerationHandle, QueueFull, Token

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


def run(jobs: list[Job], predictor: Predictor) -> list[Finished]:
    """Every job's result, in order; a failed generation fails them all (424)."""
    handles = submit_all(jobs, predictor)
    try:
        return [handle.result(timeout=predictor.config.result_timeout_s) for handle in handles]
    except GenerationError as e:
        for handle in handles:
            handle.cancel()
        raise GenerationFailed(str(e)) from None


def events(handle: GenerationHandle, predictor: Predictor, outcome: Outcome) -> Iterator[Token | Finished]:
    """A streamed job's events; the last one, the result, goes into the access log's `outcome` too."""
    for event in handle.events(timeout=predictor.config.result_timeout_s):
        if isinstance(event, Finished):
            outcome.record([event])
        yield event
