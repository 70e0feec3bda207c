"""Long work off the event loop: background jobs with a pollable status.

Opening a round reads the corpus index and manifests, which takes seconds on a large corpus; an
HTTP handler submits it here and answers at once with the job's id, and the client polls
``GET /api/jobs/{id}``. One worker thread runs jobs in order; at most ``max_pending`` wait or
run at once (more are refused), and the last ``keep`` finished jobs are remembered.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class TooManyJobs(Exception):
    """The job queue is full."""


@dataclass
class Job:
    """One unit of background work and what became of it."""

    job_id: str
    kind: str
    owner: str
    status: str = "queued"        # queued | running | done | failed
    result: Any = None
    error: str = ""
    created: float = field(default_factory=time.time)
    finished: float | None = None

    def view(self) -> dict[str, Any]:
        return {"job": self.job_id, "kind": self.kind, "owner": self.owner,
                "status": self.status, "result": self.result, "error": self.error,
                "created": self.created, "finished": self.finished}


class JobRunner:
    """Runs submitted callables one at a time in a worker thread."""

    def __init__(self, max_pending: int = 4, keep: int = 200) -> None:
        self.max_pending = max_pending
        self.keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dataengine-job")

    def submit(self, kind: str, owner: str, fn: Callable[[], Any]) -> Job:
        """Queue ``fn``; TooManyJobs when ``max_pending`` jobs wait or run already."""
        with self._lock:
            pending = sum(1 for j in self._jobs.values() if j.status in ("queued", "running"))
            if pending >= self.max_pending:
                raise TooManyJobs(f"{pending} jobs are queued or running; try again later")
            job = Job(uuid.uuid4().hex, kind, owner)
            self._jobs[job.job_id] = job
            done = [k for k, j in self._jobs.items() if j.status in ("done", "failed")]
            for k in done[:max(0, len(done) - self.keep)]:
                del self._jobs[k]
        self._pool.submit(self._run, job, fn)
        return job

    def _run(self, job: Job, fn: Callable[[], Any]) -> None:
        job.status = "running"
        try:
            job.result = fn()
            job.status = "done"
        except ValueError as exc:  # bad input found by the job: the caller's error
            job.error, job.status = str(exc), "failed"
        except Exception as exc:  # noqa: BLE001 - reported through the job's status
            logger.exception("job %s (%s) failed", job.job_id, job.kind)
            job.error, job.status = f"{type(exc).__name__}: {exc}", "failed"
        finally:
            job.finished = time.time()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
