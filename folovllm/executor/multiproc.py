"""Tensor parallelism on one host: one worker process per rank, joined by torch.distributed.

    engine process                                 worker processes (spawn), one per rank
      EngineCore (scheduler)                         Worker(rank r): 1/N of every sharded layer
      MultiprocExecutor ---- pipe per rank ---->     the same SchedulerOutput, in the same order
                        <--- rank 0's pipe ----      ModelRunnerOutput (sampled token ids)

Each step the executor pickles the SchedulerOutput once and writes the bytes to every worker's
pipe. Pipes rather than a broadcast from rank 0 over the process group: the engine process is not
a rank (it holds no shard), a pipe needs no CPU group next to NCCL, and a dead reader shows up as a
closed pipe instead of a collective that waits for its timeout. The cost is N writes of a small
message per step; a multi-host launcher would broadcast over a gloo group instead.

Every rank runs the whole step: the forward (the layers' all-reduces and all-gathers), the logits
(replicated LM head) and the sampler, with the same seed and the same per-request generators, so
every rank's InputBatch holds the same tokens (decode rows read the previous step's sampled ids on
their own device). Only rank 0 sends its ModelRunnerOutput back; the others send nothing per step
unless they fail.

The executor polls for rank 0's reply with a short timeout and checks every worker's liveness in
between, so a worker that dies mid-step (killed, out of memory) becomes a WorkerDiedError naming
the rank and exit code within a second or so, and the other workers (stuck in a collective with the
dead one) are killed. Workers ignore SIGINT (the engine decides), exit when their pipe closes or
their parent dies, and are terminated, then killed, on shutdown or when the executor is garbage
collected.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import socket
import time
import weakref
from typing import Any

from folovllm.config import EngineConfig
from folovllm.core.sched.output import ModelRunnerOutput, SchedulerOutput
from folovllm.executor.abstract import Executor
from folovllm.logger import init_logger

logger = init_logger(__name__)

STARTUP_TIMEOUT_S = 900.0
RPC_TIMEOUT_S = 900.0
POLL_S = 0.1


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker exited, or failed, while the engine needed it."""


def get_open_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_code_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"exit code {code}, killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"


# ---- the worker process ------------------------------------------------------------------------

def run_worker(config: EngineConfig, rank: int, world_size: int, master_port: int, conn, parent_pid: int) -> None:
    """A worker's main loop: join the group, load this rank's shard, then run what the executor
    sends, in order: ("rpc", method, args, kwargs) answered by every rank, ("step", pickled
    SchedulerOutput, non_block) answered by rank 0 only, ("shutdown",)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch

    from folovllm.distributed import parallel_state
    from folovllm.worker.worker import Worker

    if config.torch_device().type == "cpu":
        # N ranks on one host share its cores; torch's default (all of them each) oversubscribes.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        worker = Worker(config, rank=rank, local_rank=rank, distributed_init_method="env://")
        worker.init_device()
        worker.load_model()
    except BaseException as e:  # noqa: BLE001  the executor must hear why
        logger.exception("tensor-parallel worker rank %d failed to start", rank)
        _send(conn, ("error", f"{type(e).__name__}: {e}"))
        return
    _send(conn, ("ready", None))
    try:
        while True:
            if not conn.poll(0.5):
                if os.getppid() != parent_pid:
                    return  # the engine is gone: nobody to serve
                continue
            kind, *args = conn.recv()
            if kind == "step":
                so = pickle.loads(args[0])
                out = worker.execute_model(so, args[1])
                if rank == 0:
                    # result() also waits for the step when non_block: the reply is the future.
                    _send(conn, ("step", out.result() if args[1] else out))
                elif args[1]:
                    out.result()
            elif kind == "rpc":
                method, margs, mkwargs = args
                _send(conn, ("rpc", getattr(worker, method)(*margs, **mkwargs)))
            elif kind == "shutdown":
                parallel_state.destroy_distributed_environment()
                return
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the engine closed the pipe: it is shutting down
    except BaseException as e:  # noqa: BLE001
        logger.exception("tensor-parallel worker rank %d stopped", rank)
        _send(conn, ("error", f"{type(e).__name__}: {e}"))


def _send(conn, msg) -> None:
    try:
        conn.send(msg)
    except (OSError, ValueError):
        pass


# ---- the executor ----------------------------------------------------------------------------

def _stop_workers(procs: list, conns: list, timeout: float = 5.0) -> None:
    """Ask each worker to stop, then terminate, then kill what is left. Safe to call twice; it
    holds no reference to the executor, so weakref.finalize can run it after the executor is gone."""
    for conn in conns:
        _send(conn, ("shutdown",))
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)
    for conn in conns:
        conn.close()


class MultiprocExecutor(Executor):
    def _init_executor(self) -> None:
        self.world_size = ws = self.config.parallel_config.world_size
        if self.config.torch_device().type == "cuda":
            import torch
            if torch.cuda.device_count() < ws:
                raise ValueError(f"tensor_parallel_size={ws} needs {ws} GPUs on this host, "
                                 f"found {torch.cuda.device_count()}")
        self.master_port = get_open_port()
        ctx = mp.get_context("spawn")  # CUDA needs a fresh process; also no state copied by fork
        self.procs, self.conns = [], []
        self._failed: WorkerDiedError | None = None
        self._closed = False
        self._step_seq = 0        # steps sent
        self._reply_seq = 0       # rank 0's step replies read
        self._replies: dict[int, ModelRunnerOutput] = {}
        self._stash: list[list] = [[] for _ in range(ws)]  # messages read early by _check_alive
        for rank in range(ws):
            parent_end, child_end = ctx.Pipe(duplex=True)
            # Not daemonic: a daemonic process may not start children (a worker's compiler may);
            # stopping them is _stop_workers' job (shutdown, finalize, and the parent check).
            p = ctx.Process(target=run_worker, name=f"folovllm-tp-worker-{rank}",
                            args=(self.config, rank, ws, self.master_port, child_end, os.getpid()))
            p.start()
            child_end.close()
            self.procs.append(p)
            self.conns.append(parent_end)
        self._finalizer = weakref.finalize(self, _stop_workers, self.procs, self.conns)
        try:
            for rank in range(ws):
                self._recv(rank, "ready", STARTUP_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        logger.info("%d tensor-parallel workers ready (MASTER_PORT %d)", ws, self.master_port)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    # ---- failures ----------------------------------------------------------------------

    def _fail(self, what: str) -> WorkerDiedError:
        """Describe every worker's state, stop them all, remember the error for later calls."""
        time.sleep(0.2)  # a rank that died brings its peers down within moments: name them all
        dead = [(r, p) for r, p in enumerate(self.procs) if p.exitcode not in (None, 0)]
        if dead and f"rank {dead[0][0]} " not in what:
            # A peer's collective fails once a rank is killed, and that error may arrive first:
            # lead with the rank that died, since it is the cause.
            r, p = dead[0]
            what = f"tensor-parallel worker rank {r} (pid {p.pid}) died ({_exit_code_text(p.exitcode)}); then {what}"
        states = ", ".join(f"rank {r} (pid {p.pid}): {_exit_code_text(p.exitcode)}"
                           for r, p in enumerate(self.procs))
        self._failed = WorkerDiedError(f"{what}; workers: {states}. The engine cannot continue; "
                                       "see the worker's log above for its error")
        self.shutdown()
        return self._failed

    def _check_alive(self) -> None:
        for rank, p in enumerate(self.procs):
            if not p.is_alive():
                raise self._fail(f"tensor-parallel worker rank {rank} (pid {p.pid}) died "
                                 f"({_exit_code_text(p.exitcode)})")
        for rank, conn in enumerate(self.conns):
            # Ranks > 0 send rpc replies (kept for _recv) and errors; no step replies.
            if rank and not self._stash[rank] and conn.poll(0):
                msg = self._read(rank)
                if msg[0] == "error":
                    raise self._fail(f"tensor-parallel worker rank {rank} failed: {msg[1]}")
                self._stash[rank].append(msg)

    def _read(self, rank: int):
        try:
            return self.conns[rank].recv()
        except (EOFError, OSError):
            self.procs[rank].join(1.0)
            raise self._fail(f"tensor-parallel worker rank {rank} (pid {self.procs[rank].pid}) closed its "
                             f"pipe ({_exit_code_text(self.procs[rank].exitcode)})") from None

    def _recv(self, rank: int, kind: str, timeout: float):
        """The next message from `rank`, which must be of `kind`; polls every worker's liveness
        while it waits."""
        if self._failed is not None:
            raise self._failed
        deadline = time.monotonic() + timeout
        while not self._stash[rank] and not self.conns[rank].poll(POLL_S):
            self._check_alive()
            if time.monotonic() > deadline:
                raise self._fail(f"tensor-parallel worker rank {rank} did not answer {kind!r} "
                                 f"within {timeout:.0f} s")
        msg = self._stash[rank].pop(0) if self._stash[rank] else self._read(rank)
        if msg[0] == "error":
            raise self._fail(f"tensor-parallel worker rank {rank} failed: {msg[1]}")
        if msg[0] != kind:
            raise self._fail(f"tensor-parallel worker rank {rank} sent {msg[0]!r}, expected {kind!r}")
        return msg[1]

    def _send_all(self, msg) -> None:
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise WorkerDiedError("the tensor-parallel executor was shut down")
        for rank, conn in enumerate(self.conns):
            try:
                conn.send(msg)
            except (OSError, ValueError):
                raise self._fail(f"tensor-parallel worker rank {rank} (pid {self.procs[rank].pid}) "
                                 f"is gone ({_exit_code_text(self.procs[rank].exitcode)})") from None

    # ---- the interface -----------------------------------------------------------------

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list[Any]:
        # Step replies still unread come first on rank 0's pipe: collect them before the rpc's.
        self._drain_steps()
        self._send_all(("rpc", method, tuple(args), dict(kwargs or {})))
        return [self._recv(rank, "rpc", RPC_TIMEOUT_S) for rank in range(self.world_size)]

    def execute_model(self, scheduler_output: SchedulerOutput, non_block: bool = False):
        # Pickled once, sent N times: every rank gets the same bytes.
        self._send_all(("step", pickle.dumps(scheduler_output, protocol=pickle.HIGHEST_PROTOCOL), non_block))
        seq = self._step_seq
        self._step_seq += 1
        future = _StepFuture(self, seq)
        return future if non_block else future.result()

    def _step_result(self, seq: int) -> ModelRunnerOutput:
        """Rank 0's reply to step `seq`; replies arrive in step order, so earlier ones are read
        (and kept for their own futures) first."""
        while self._reply_seq <= seq:
            self._replies[self._reply_seq] = self._recv(0, "step", RPC_TIMEOUT_S)
            self._reply_seq += 1
        return self._replies.pop(seq)

    def _drain_steps(self) -> None:
        while self._reply_seq < self._step_seq:
            self._replies[self._reply_seq] = self._recv(0, "step", RPC_TIMEOUT_S)
            self._reply_seq += 1

    def parameter_bytes(self) -> list[dict[str, int]]:
        """Per rank: bytes of its sharded and replicated parameters (see Worker.parameter_bytes)."""
        return self.collective_rpc("parameter_bytes")

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finalizer()  # runs _stop_workers once, and detaches it from garbage collection


class _StepFuture:
    """A step sent to the workers; result() waits for rank 0's reply (idempotent)."""

    def __init__(self, executor: MultiprocExecutor, seq: int) -> None:
        self._executor, self._seq = executor, seq
        self._result: ModelRunnerOutput | None = None

    def result(self) -> ModelRunnerOutput:
        if self._result is None:
            self._result = self._executor._step_result(self._seq)
        return self._result
