"""Where dataengine meets Ray: connecting, and mapping per-shard work over the cluster.

Stages are plain callables over one image shard; this module runs them as Ray tasks (or on an
actor pool for model inference), retries failed units, and reports the ones that still fail.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

logger = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster named by ``address`` / ``RAY_ADDRESS``, or start a local one.

    Does nothing when Ray is already initialised (tests, ``ray job submit``).
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind 127.0.0.1 locally
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Ray reads the variable once, at import: when ray was imported before this call the
        # local instance would still bind the machine's other address
        from ray._private import ray_constants

        if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] in ("0", "false", "False"):
            ray_constants.ENABLE_RAY_CLUSTER = False
        # address="local": always start our own instance; without it ray.init() silently
        # attaches to any other Ray instance running on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=True)
    logger.info("ray: %s", ray.cluster_resources())


def map_tasks(fn: Callable[..., dict[str, Any]], items: Iterable[Any], *,
              num_cpus: float = 1.0, num_gpus: float = 0.0, retries: int = 2,
              progress: Callable[[dict[str, Any]], None] | None = None,
              **kwargs: Any) -> list[dict[str, Any]]:
    """Run ``fn(item, **kwargs)`` as one Ray task per item; returns results in item order.

    ``fn`` returns a status dict; an exception becomes ``{"item": item, "error": "..."}`` after
    ``retries`` retries, so one bad unit never stops the others.
    """
    import ray

    ensure_ray()
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=retries,
                        retry_exceptions=True)(fn)
    items = list(items)
    refs = {remote.remote(item, **kwargs): i for i, item in enumerate(items)}
    results: list[dict[str, Any] | None] = [None] * len(items)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ref = done[0]
        i = refs[ref]
        try:
            results[i] = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - failures are data
            logger.error("work unit %r failed: %s", items[i], exc)
            results[i] = {"item": items[i], "error": f"{type(exc).__name__}: {exc}"}
        if progress is not None:
            progress(results[i])  # type: ignore[arg-type]
    return results  # type: ignore[return-value]


def stream_tasks(fn: Callable[..., dict[str, Any]], items: Iterable[Any], *,
                 num_cpus: float = 1.0, max_in_flight: int = 4, retries: int = 2,
                 **kwargs: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Run ``fn(item, **kwargs)`` as Ray tasks over a stream of items, at most
    ``max_in_flight`` at once, pulling the next item only when one finishes; yields
    ``(item, result)`` in completion order (an exception becomes ``{"error": ...}``). The
    caller's memory holds the items in flight, not the stream."""
    import ray

    ensure_ray()
    remote = ray.remote(num_cpus=num_cpus, max_retries=retries, retry_exceptions=True)(fn)
    source = iter(items)
    running: dict[Any, Any] = {}
    exhausted = False
    while True:
        while not exhausted and len(running) < max_in_flight:
            item = next(source, _END)
            if item is _END:
                exhausted = True
                break
            running[remote.remote(item, **kwargs)] = item
        if not running:
            return
        done, _ = ray.wait(list(running), num_returns=1)
        item = running.pop(done[0])
        try:
            result = ray.get(done[0])
        except Exception as exc:  # noqa: BLE001 - failures are data
            logger.error("work unit failed: %s", exc)
            result = {"error": f"{type(exc).__name__}: {exc}"}
        yield item, result


_END = object()


def map_actors(actor_cls: type, init_args: tuple[Any, ...], items: Iterable[Any], *,
               num_actors: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
               retries: int = 2, failed: Callable[[Any], bool] | None = None,
               failure: Callable[[Any, str], dict[str, Any]] | None = None,
               progress: Callable[[Any], None] | None = None) -> list[Any]:
    """Run ``actor(item)`` for every item on a pool of ``actor_cls(*init_args)`` Ray actors
    (model replicas loaded once each); returns the results in completion order.

    One item is in flight per actor. A unit that raises, whose actor dies (the actor is
    replaced), or whose result ``failed(result)`` flags, is retried up to ``retries`` times; then
    ``failure(item, message)`` (default ``{"item": item, "error": message}``) stands for it, so
    one bad unit never stops the others.
    """
    import ray

    ensure_ray()
    remote_cls = ray.remote(actor_cls).options(num_cpus=num_cpus, num_gpus=num_gpus)
    queue = list(items)
    attempts = [0] * len(queue)
    pending = list(range(len(queue)))
    idle = [remote_cls.remote(*init_args) for _ in range(min(num_actors, len(queue)))]
    running: dict[Any, tuple[int, Any]] = {}
    results: list[Any] = []
    try:
        while pending or running:
            while pending and idle:
                i, actor = pending.pop(0), idle.pop()
                running[actor.__call__.remote(queue[i])] = (i, actor)
            done, _ = ray.wait(list(running), num_returns=1)
            i, actor = running.pop(done[0])
            try:
                result = ray.get(done[0])
                idle.append(actor)
                error = "unit reported a failure" if failed and failed(result) else ""
            except ray.exceptions.RayActorError as exc:
                logger.error("actor died on %r: %s; replacing it", queue[i], exc)
                idle.append(remote_cls.remote(*init_args))
                result, error = None, f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - failures are data, retried below
                logger.error("work unit %r failed: %s", queue[i], exc)
                idle.append(actor)
                result, error = None, f"{type(exc).__name__}: {exc}"
            if error and attempts[i] < retries:
                attempts[i] += 1
                pending.append(i)
                continue
            if error and result is None:
                result = (failure or _failure)(queue[i], error[:2000])
            results.append(result)
            if progress is not None:
                progress(result)
    finally:
        for a in idle + [a for _, a in running.values()]:
            ray.kill(a)
    return results


def _failure(item: Any, message: str) -> dict[str, Any]:
    return {"item": item, "error": message}
