"""Run block tasks on Ray with bounded in-flight work (memory flat in AOI size)."""

from __future__ import annotations

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


def run_blocks(
    task: Callable[..., T],
    items: Sequence[Any],
    *args: Any,
    num_cpus: float = 1.0,
    max_in_flight: int | None = None,
    reporter: Reporter | None = None,
    message: str = "processing blocks",
    max_retries: int = 3,
) -> list[T]:
    """Call ``task(item, *args)`` for every item as a Ray task; at most ``max_in_flight`` at once.

    Results come back in item order. Task failures are retried by Ray (``max_retries``) —
    blocks are idempotent writes of disjoint chunks — and re-raised if they persist.
    """
    reporter = reporter or NullReporter()
    remote = ray.remote(task).options(
        num_cpus=num_cpus,
        max_retries=max_retries,
        retry_exceptions=False,
        runtime_env={"env_vars": carried_env()},
    )
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
                results[pending.pop(ref)] = ray.get(ref)
            reporter.progress(100.0 * len(results) / total, f"{message}: {len(results)}/{total}")
    except BaseException:
        _drain(list(pending))
        raise
    return [results[i] for i in range(total)]


def _drain(refs: list[ray.ObjectRef], timeout_s: float = 60.0) -> None:
    """Cancel unfinished tasks and wait until they are gone, so none writes after the caller
    has cleaned up its temporary output."""
    for ref in refs:
        ray.cancel(ref, force=True)
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
