"""Where the parallel pieces of ``prepare`` run: this process, local worker processes, or a Ray cluster.

Each engine has one method, ``map(fn, jobs)``: ``fn(context, *job)`` for every job, the results yielded in the
jobs' order, with only a few jobs in flight at a time (so a long input is never read far ahead). The engines
differ only in where ``fn`` runs; the pieces are the same functions (``gpt2fast.data.work``), so the output is
too.

Ray: actors, one per CPU the cluster offers (or ``workers``), each holding the context (options, tokenizer,
work folder) once, fed through ``ray.util.ActorPool``, which keeps the results in order and a job per actor in
flight. Actors rather than Ray Data: the stages need ordered results and a per-worker tokenizer, which
stateful actors give directly, where Ray Data's blocks would need their order restored and the tokenizer
rebuilt per batch. The workers read and write the work folder inside ``--out``, which must therefore be a path
every node sees (a shared file system); the driver reads the inputs and writes the shards."""
from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import sys
from typing import Callable, Iterable, Iterator, Optional, Sequence

from gpt2fast.data.work import Context
from gpt2fast.errors import DataError

RAY_EXTRA = 'pip install "gpt2fast[ray]"'


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class InProcess:
    """Every job here, one after the other (``--workers 1``)."""
    name = "local"

    def __init__(self, ctx: Context):
        self.ctx, self.workers = ctx, 1

    def map(self, fn: Callable, jobs: Iterable[Sequence]) -> Iterator:
        for job in jobs:
            yield fn(self.ctx, *job)

    def close(self) -> None:
        pass


_context: Optional[Context] = None  # a worker process's context, set by _init_worker


def _init_worker(ctx: Context) -> None:
    global _context
    _context = ctx
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle: it stops the pool
    _die_with_the_driver()


def _die_with_the_driver() -> None:
    """On Linux, have the kernel end this worker when the driver dies (a kill -9 leaves no orphan working on,
    holding the driver's output open)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the driver died before the call: go now
        os._exit(1)


def _call(fn: Callable, job: Sequence):
    return fn(_context, *job)


class LocalPool:
    """Jobs on ``workers`` processes of this machine (forked where the platform allows, so the tokenizer and
    options are inherited rather than sent), ``2 * workers`` jobs in flight. A worker that dies (killed, out of
    memory) is an error here, never a hang."""
    name = "local"

    def __init__(self, ctx: Context, workers: int):
        from concurrent.futures import ProcessPoolExecutor

        self.workers = workers
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin" else "spawn"
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                         initializer=_init_worker, initargs=(ctx,))

    def map(self, fn: Callable, jobs: Iterable[Sequence]) -> Iterator:
        pending = collections.deque()
        for job in jobs:
            pending.append(self._pool.submit(_call, fn, job))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:  # the work is done or abandoned: nothing is left to wait for
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join()


class RayEngine:
    """Jobs on Ray actors: the cluster at ``RAY_ADDRESS`` if set, else a Ray instance started on this machine."""
    name = "ray"

    def __init__(self, ctx: Context, workers: Optional[int]):
        ray = import_ray()
        from ray.util import ActorPool

        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            address = os.environ.get("RAY_ADDRESS") or None
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                         **({} if address or not workers else {"num_cpus": workers}))
            except Exception as e:  # ConnectionError, RuntimeError...: Ray's own, and the user's to fix
                where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray instance"
                raise DataError(f"--engine ray could not start or reach {where} ({type(e).__name__}: {e}); check "
                                f"the cluster (`ray status`), or use --engine local") from None
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        actor = ray.remote(num_cpus=1)(_RayWorker)
        ctx_ref = ray.put(ctx)
        self._actors = [actor.remote(ctx_ref) for _ in range(self.workers)]
        self._ActorPool = ActorPool

    def map(self, fn: Callable, jobs: Iterable[Sequence]) -> Iterator:
        pool = self._ActorPool(self._actors)  # its own map() would read every job ahead: bound it here
        submitted = 0
        for job in jobs:
            pool.submit(lambda a, j: a.run.remote(fn, j), job)
            submitted += 1
            if submitted >= 2 * self.workers:
                submitted -= 1
                yield pool.get_next()
        while pool.has_next():
            yield pool.get_next()

    def close(self) -> None:
        for a in self._actors:
            self._ray.kill(a)
        if self._started:
            self._ray.shutdown()


class _RayWorker:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def run(self, fn: Callable, job: Sequence):
        return fn(self.ctx, *job)


def import_ray():
    try:
        import ray
        from ray.util import ActorPool  # noqa: F401
    except ImportError:
        ray = sys.modules.get("ray")
        where = getattr(ray, "__path__", None)
        shadow = (f" (the `ray` that Python found, {list(where)[0]}, is a folder, not Ray: run from another "
                  f"folder)" if where and not hasattr(ray, "init") else "")
        raise DataError(f"--engine ray needs Ray, which is not installed{shadow}; install it with {RAY_EXTRA} "
                        f"(or use --engine local)") from None
    return ray


def make_engine(engine: str, ctx: Context, workers: Optional[int]):
    if engine == "ray":
        return RayEngine(ctx, workers)
    workers = workers or default_workers()
    return InProcess(ctx) if workers == 1 else LocalPool(ctx, workers)
