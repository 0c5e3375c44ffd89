"""Run block tasks on Ray with bounded in-flight work (memory flat in AOI size)."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import ray

from rasterkube.constants import ENV_RAY_ADDRESS, Reason
from rasterkube.errors import UserError
from rasterkube.runtime import scheduling, usage
from rasterkube.runtime.progress import NullReporter, Reporter

T = TypeVar("T")
LOOPBACK = "127.0.0.1"
_embedded = False
#: How long the driver waits for a result before it looks whether Ray can run the tasks at
#: all (one GCS request per look; results that arrive end the wait at once).
POLL_S = 1.0
#: What run_blocks' and TaskGroup's tasks are called in messages.
BLOCK_TASK = "block task"

# Settings the driver has that the workers need to reach storage (object store endpoint and
# credentials, GDAL/rasterio tuning). Workers may run on other nodes, or were started before
# the driver's environment changed, so they are passed explicitly with every task.
CARRIED_ENV_PREFIXES = ("AWS_", "GDAL_", "CPL_", "VSI_", "RASTERKUBE_")


def carried_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(CARRIED_ENV_PREFIXES)}


#: ``ray.init`` address that always starts a new local instance. ``address=None`` would join
#: whatever ``/tmp/ray/ray_current_cluster`` names: a live ``ray start`` cluster of someone
#: else's, or one that was killed and left the file behind (then ray.init fails with "When
#: connecting to an existing cluster, num_cpus and num_gpus must not be provided").
EMBEDDED_ADDRESS = "local"
ENV_AUTH_MODE = "RAY_AUTH_MODE"
ENV_AUTH_TOKEN = "RAY_AUTH_TOKEN"
ENV_AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
TOKEN_FILE = os.path.join(".ray", "auth_token")  # under the home directory


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS (or ``address``), else start an embedded local Ray once.

    The embedded Ray is always a new instance of this process's own, whatever other Ray state
    the machine has (live clusters, files of dead ones)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get(ENV_RAY_ADDRESS)
    if address and address != EMBEDDED_ADDRESS:
        _check_reachable(address)
        use_token_auth_if_available()
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError) as exc:
            raise UserError(
                f"RAY_ADDRESS={address}: cannot connect to the Ray cluster ({str(exc).splitlines()[0]}). "
                "Check the address (host:port of the head's GCS, e.g. 127.0.0.1:6379); if the cluster uses "
                "token auth make its token available (~/.ray/auth_token, RAY_AUTH_TOKEN or "
                "RAY_AUTH_TOKEN_PATH); unset RAY_ADDRESS to use an embedded local Ray"
            ) from None
    else:
        global _embedded
        _embedded = True
        ray.init(
            address=EMBEDDED_ADDRESS,
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
            # The embedded Ray serves this process only: keep all of it on loopback.
            _node_ip_address=LOOPBACK,
        )


def auth_token_available(environ: dict[str, str] | None = None) -> bool:
    """A Ray auth token is where Ray looks for one: RAY_AUTH_TOKEN, the file named by
    RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token."""
    env = os.environ if environ is None else environ
    if env.get(ENV_AUTH_TOKEN, "").strip():
        return True
    home = env.get("HOME") or os.path.expanduser("~")
    path = os.path.expanduser(env.get(ENV_AUTH_TOKEN_PATH) or os.path.join(home, TOKEN_FILE))
    return os.path.isfile(path) and os.path.getsize(path) > 0


def use_token_auth_if_available() -> bool:
    """Client side of Ray's token auth (the default of ``ray start`` since 2.5x when a token
    exists): with RAY_AUTH_MODE unset and a token available, connect in token mode. Ray itself
    does this only for clusters it finds on its own, never for an explicit address; a client
    in token mode also connects to a cluster without auth, so this never hurts. Returns
    whether token mode is on."""
    mode = os.environ.get(ENV_AUTH_MODE)
    if mode is not None:
        return mode.lower() == "token"
    if not auth_token_available():
        return False
    os.environ[ENV_AUTH_MODE] = "token"
    # Ray's C++ config read RAY_AUTH_MODE when ray was imported: make it read it again.
    from ray._raylet import Config

    Config.initialize("")
    return True


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


def _remote(task: Callable[..., T], demand: scheduling.Demand, max_retries: int) -> Any:
    """The remote function of ``task``: it returns ``(result, usage)`` (:func:`_result`)."""
    task = usage.measured(task, gpus=demand.get(scheduling.GPU, 0.0))
    return _cached_remote(task, tuple(sorted(demand.items())), max_retries, tuple(sorted(carried_env().items())))


@functools.lru_cache(maxsize=64)
def _cached_remote(
    task: Callable[..., T], demand: tuple[tuple[str, float], ...], max_retries: int, env: tuple[tuple[str, str], ...]
) -> Any:
    """One Ray remote function per task and options: Ray pickles a function when it is first
    called remotely, so a new one per call to run_blocks cost every job that again."""
    resources = dict(demand)
    options: dict[str, Any] = {"num_cpus": resources.get(scheduling.CPU, 0.0)}
    if scheduling.GPU in resources:
        options["num_gpus"] = resources[scheduling.GPU]
    if scheduling.MEMORY in resources:
        options["memory"] = resources[scheduling.MEMORY]
    return ray.remote(task).options(
        **options,
        max_retries=max_retries,
        retry_exceptions=False,
        runtime_env={"env_vars": dict(env)},
    )


def _result(value: tuple[T, usage.Usage]) -> T:
    """A measured task's result; its usage goes to the job being measured."""
    result, used = value
    usage.record(used)
    return result


def _run_and_record(item: Any, task: Callable[..., Any], ledger: Any, *args: Any) -> Any:
    """A block task that records its block in the ledger once it has written it (a Ray task:
    the marker is written by the worker that wrote the chunks, right after them)."""
    result = task(item, *args)
    ledger.record(item, result)
    return result


def _watch(demand: scheduling.Demand, reporter: Reporter, now: Callable[[], tuple[float, str]]) -> scheduling.Watch:
    """A scheduling watch that reports through ``reporter``: a wait's message (reason
    Unschedulable) when it starts or changes, and ``now()``'s (percent, message) when it ends."""

    def report(wait: str | None) -> None:
        percent, message = now()
        if wait is None:
            reporter.progress(percent, message)
        else:
            reporter.progress(percent, wait, reason=Reason.UNSCHEDULABLE.value)

    return scheduling.Watch(demand, BLOCK_TASK, report=report)


def run_blocks(
    task: Callable[..., T],
    items: Sequence[Any],
    *args: Any,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    memory: int | None = None,
    max_in_flight: int | None = None,
    reporter: Reporter | None = None,
    message: str = "processing blocks",
    max_retries: int = 3,
    on_result: Callable[[int, T], None] | None = None,
    ledger: Any | None = None,
    finished: Mapping[Any, T] | None = None,
) -> list[T]:
    """Call ``task(item, *args)`` for every item as a Ray task; at most ``max_in_flight`` at once.

    Results come back in item order. Task failures are retried by Ray (``max_retries``) —
    blocks are idempotent writes of disjoint chunks — and re-raised if they persist.
    ``on_result(index, result)`` is called on the driver as each result arrives (in completion
    order), e.g. to start follow-up work (:class:`TaskGroup`) before the last block is done.

    Resuming (:mod:`rasterkube.staging`): items in ``finished`` are not run again, their
    recorded results are used; with a ``ledger`` (``.record(item, result)``) every task
    records its item once it is done.

    Each task asks Ray for ``num_cpus``, ``num_gpus`` and ``memory`` (bytes). While nothing
    finishes and Ray cannot place the tasks — no node has that much, or none has it free —
    the reporter says so (reason ``Unschedulable``), and after the job's scheduling bound
    (:func:`scheduling.bound`) the run fails with :class:`~rasterkube.errors.SchedulingTimeout`.
    """
    reporter = reporter or NullReporter()
    demand = scheduling.demand_of(num_cpus, num_gpus, memory)
    call, lead = (_run_and_record, (task, ledger)) if ledger is not None else (task, ())
    remote = _remote(call, demand, max_retries)
    limit = max_in_flight or default_in_flight()
    # Large shared arguments go to the object store once, not once per task.
    shared = [ray.put(a) for a in (*lead, *args)]
    finished = finished or {}
    results: dict[int, T] = {i: finished[item] for i, item in enumerate(items) if item in finished}
    reused = f" ({len(results)} reused)" if results else ""
    todo = [i for i in range(len(items)) if i not in results]
    pending: dict[ray.ObjectRef, int] = {}
    next_todo = 0
    total = len(items)
    if on_result is not None:
        for index in sorted(results):
            on_result(index, results[index])
    watch = _watch(demand, reporter,
                   lambda: (100.0 * len(results) / total, f"{message}: {len(results)}/{total}{reused}"))  # fmt: skip
    reporter.progress(100.0 * len(results) / max(total, 1), f"{message}: {len(results)}/{total}{reused}")
    try:
        while next_todo < len(todo) or pending:
            while next_todo < len(todo) and len(pending) < limit:
                pending[remote.remote(items[todo[next_todo]], *shared)] = todo[next_todo]
                next_todo += 1
            done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            if not done:
                watch.check(len(pending))
                continue
            for ref in done:
                index = pending.pop(ref)
                results[index] = _result(ray.get(ref))
                if on_result is not None:
                    on_result(index, results[index])
            watch.progressed()
            reporter.progress(100.0 * len(results) / total, f"{message}: {len(results)}/{total}{reused}")
    except BaseException:
        _drain(list(pending))
        raise
    return [results[i] for i in range(total)]


class TaskGroup:
    """Ray tasks of one function submitted one at a time (e.g. from ``run_blocks``'
    ``on_result``, as the work they need becomes available), with run_blocks' options;
    :meth:`results` gathers them in submission order (and watches their scheduling as
    run_blocks does). Use as a context manager: leaving it by an exception cancels what is
    still running, so nothing writes after the caller cleaned up."""

    def __init__(
        self,
        task: Callable[..., T],
        *args: Any,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        memory: int | None = None,
        max_retries: int = 3,
    ) -> None:
        self._demand = scheduling.demand_of(num_cpus, num_gpus, memory)
        self._remote = _remote(task, self._demand, max_retries)
        self._shared = [ray.put(a) for a in args]
        self._refs: list[ray.ObjectRef] = []

    def submit(self, item: Any) -> None:
        self._refs.append(self._remote.remote(item, *self._shared))

    def results(self, reporter: Reporter | None = None, message: str = "processing") -> list[Any]:
        reporter = reporter or NullReporter()
        total, left = len(self._refs), list(self._refs)
        watch = _watch(
            self._demand, reporter,
            lambda: (100.0 * (total - len(left)) / total, f"{message}: {total - len(left)}/{total}"),
        )  # fmt: skip
        while left:
            done, left = ray.wait(left, num_returns=1, timeout=POLL_S)
            if not done:
                watch.check(len(left))
                continue
            watch.progressed()
            reporter.progress(100.0 * (total - len(left)) / total, f"{message}: {total - len(left)}/{total}")
        return [_result(value) for value in ray.get(self._refs)]

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
