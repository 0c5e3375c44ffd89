"""Run block tasks on Ray with bounded in-flight work (memory flat in AOI size)."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ray

from rasterkube.constants import ENV_RAY_ADDRESS
from rasterkube.errors import UserError
from rasterkube.runtime.progress import NullReporter, Reporter

T = TypeVar("T")
LOOPBACK = "127.0.0.1"
_embedded = False

# Settings the driver has that the workers need to reach storage (object store endpoint and
# credentials, GDAL/rasterio tuning). Workers may run on other nodes, or were started before
# the driver's environment changed, so they are passed explicitly with every task.
CARRIED_ENV_PREFIXES = ("AWS_", "GDAL_", "CPL_", "VSI_", "RASTERKUBE_")


def carried_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(CARRIED_ENV_PREFIXES)}


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS (or ``address``), else start an embedded local Ray once."""
    if ray.is_initialized():
        return
    address = address or os.environ.get(ENV_RAY_ADDRESS)
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError) as exc:
            raise UserError(
                f"RAY_ADDRESS={address}: cannot connect to the Ray cluster ({str(exc).splitlines()[0]}). "
                "Check the address (host:port of the head's GCS, e.g. 127.0.0.1:6379); if the cluster uses "
                "token auth set RAY_AUTH_MODE=token and make its token available (~/.ray/auth_token or "
                "RAY_AUTH_TOKEN); unset RAY_ADDRESS to use an embedded local Ray"
            ) from None
    else:
        global _embedded
        _embedded = True
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
            # The embedded Ray serves this process only: keep all of it on loopback.
            _node_ip_address=LOOPBACK,
        )


def embedded() -> bool:
    """True when this process started its own local Ray (no RAY_ADDRESS): it ends with us."""
    return _embedded and ray.is_initialized()


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when nothing listens at ``address``."""
    target = address.removeprefix("ray://").removeprefix("http://")
    if target in ("auto", "local") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise UserError(
            f"RAY_ADDRESS={address}: cannot connect to the Ray cluster ({exc}); start it (ray start --head) "
            "or unset RAY_ADDRESS to use an embedded local Ray"
        ) from None


def default_in_flight() -> int:
    """Two tasks per CPU keeps workers busy while one block is read and one written."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(2, 2 * cpus)


def _remote(task: Callable[..., T], num_cpus: float, max_retries: int) -> Any:
    return _cached_remote(task, num_cpus, max_retries, tuple(sorted(carried_env().items())))


@functools.lru_cache(maxsize=64)
def _cached_remote(task: Callable[..., T], num_cpus: float, max_retries: int, env: tuple[tuple[str, str], ...]) -> Any:
    """One Ray remote function per task and options: Ray pickles a function when it is first
    called remotely, so a new one per call to run_blocks cost every job that again."""
    return ray.remote(task).options(
        num_cpus=num_cpus,
        max_retries=max_retries,
        retry_exceptions=False,
        runtime_env={"env_vars": dict(env)},
    )


def run_blocks(
    task: Callable[..., T],
    items: Sequence[Any],
    *args: Any,
    num_cpus: float = 1.0,
    max_in_flight: int | None = None,
    reporter: Reporter | None = None,
    message: str = "processing blocks",
    max_retries: int = 3,
    on_result: Callable[[int, T], None] | None = None,
) -> list[T]:
    """Call ``task(item, *args)`` for every item as a Ray task; at most ``max_in_flight`` at once.

    Results come back in item order. Task failures are retried by Ray (``max_retries``) —
    blocks are idempotent writes of disjoint chunks — and re-raised if they persist.
    ``on_result(index, result)`` is called on the driver as each result arrives (in completion
    order), e.g. to start follow-up work (:class:`TaskGroup`) before the last block is done.
    """
    reporter = reporter or NullReporter()
    remote = _remote(task, num_cpus, max_retries)
    limit = max_in_flight or default_in_flight()
    # Large shared arguments go to the object store once, not once per task.
    shared = [ray.put(a) for a in args]
    results: dict[int, T] = {}
    pending: dict[ray.ObjectRef, int] = {}
    next_item = 0
    total = len(items)
    reporter.progress(0, f"{message}: 0/{total}")
    try:
        while next_item < total or pending:
            while next_item < total and len(pending) < limit:
                pending[remote.remote(items[next_item], *shared)] = next_item
                next_item += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                results[index] = ray.get(ref)
                if on_result is not None:
                    on_result(index, results[index])
            reporter.progress(100.0 * len(results) / total, f"{message}: {len(results)}/{total}")
    except BaseException:
        _drain(list(pending))
        raise
    return [results[i] for i in range(total)]


class TaskGroup:
    """Ray tasks of one function submitted one at a time (e.g. from ``run_blocks``'
    ``on_result``, as the work they need becomes available), with run_blocks' options;
    :meth:`results` gathers them in submission order. Use as a context manager: leaving it by
    an exception cancels what is still running, so nothing writes after the caller cleaned up."""

    def __init__(self, task: Callable[..., T], *args: Any, num_cpus: float = 1.0, max_retries: int = 3) -> None:
        self._remote = _remote(task, num_cpus, max_retries)
        self._shared = [ray.put(a) for a in args]
        self._refs: list[ray.ObjectRef] = []

    def submit(self, item: Any) -> None:
        self._refs.append(self._remote.remote(item, *self._shared))

    def results(self, reporter: Reporter | None = None, message: str = "processing") -> list[Any]:
        reporter = reporter or NullReporter()
        total, left = len(self._refs), list(self._refs)
        while left:
            _, left = ray.wait(left, num_returns=1)
            reporter.progress(100.0 * (total - len(left)) / total, f"{message}: {total - len(left)}/{total}")
        return ray.get(self._refs)

    def __enter__(self) -> TaskGroup:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            _drain(self._refs)


def _drain(refs: list[ray.ObjectRef], timeout_s: float = 60.0) -> None:
    """Cancel unfinished tasks and wait until they are gone, so none writes after the caller
    has cleaned up its temporary output."""
    for ref in refs:
        ray.cancel(ref, force=True)
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
