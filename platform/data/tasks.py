"""The one way genrec's data code runs work on Ray: one task per work item, results in order.

Shared arguments (a source plan, a vocabulary, a synthetic world) go to the object
store once and every task reads them from there. A task that raises a genrec error
(bad source, bad config) surfaces as that error, not as a Ray traceback, so a job
still ends with one clear line.
"""

from __future__ import annotations

from ..errors import GenrecError


def _call(fn, names: tuple, item: dict, *shared):
    return fn(**item, **dict(zip(names, shared)))


def run_tasks(fn, items: list[dict], progress: str | None = None, **shared) -> list:
    """[fn(**item, **shared) for item in items], each in its own 1-CPU Ray task (in parallel)."""
    import ray

    names = tuple(shared)
    refs = [ray.put(v) for v in shared.values()]
    task = ray.remote(_call).options(num_cpus=1)
    pending = {task.remote(fn, names, item, *refs): i for i, item in enumerate(items)}
    results: list = [None] * len(items)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=progress, unit="task")
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            try:
                results[index] = ray.get(done[0])
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, GenrecError):
                    raise err.cause from None
                raise
            if bar is not None:
                bar.update(1)
    finally:
        for ref in pending:
            ray.cancel(ref)
        if bar is not None:
            bar.close()
    return results
