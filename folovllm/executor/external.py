"""Tensor parallelism over ranks started by the user (one per device, on any host), joined by
torch.distributed's env:// rendezvous.

    rank 0 (the engine process)                    ranks 1..N-1 (`folovllm worker`, any host)
      EngineCore (scheduler)                         Worker(rank r)
      ExternalRanksExecutor                          serve_commands(): loop
        Worker(rank 0), in this process                receive a command (broadcast from rank 0)
        broadcast command ---- gloo group ---->        run it on this rank's Worker
        run it on rank 0                               rpc: gather the result to rank 0
        rpc: gather every rank's result <------        step: send nothing back

Every process reads MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK from its
environment. The engine is rank 0 and is chosen with FOLOVLLM_DISTRIBUTED=env (see
folovllm/executor/__init__.py); WORLD_SIZE must equal tensor_parallel_size.

Commands travel over a gloo group of their own (created next to the model's group, NCCL or
gloo), with a long timeout so an engine that sits idle does not time its workers out:
("config", fingerprint) once, ("rpc", method, args, kwargs), ("step", SchedulerOutput) and
("shutdown",). A step runs synchronously on rank 0: execute_model(non_block=True) returns an
already finished future, so async scheduling works but does not overlap the step with
scheduling.

A rank that goes away breaks the next collective: the workers exit with a message saying rank 0
is gone; the engine raises WorkerDiedError naming the rank (and its pid and host, which the ranks
exchange at start-up), since a bare gloo "connection closed by peer" names only an address.
"""

from __future__ import annotations

import datetime
import os
import socket
import weakref
from typing import Any

from folovllm.config import EngineConfig
from folovllm.core.sched.output import ModelRunnerOutput, SchedulerOutput
from folovllm.executor.abstract import Executor
from folovllm.logger import init_logger

logger = init_logger(__name__)

ENV_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
# Commands wait this long for the next one (an idle engine sends none).
CONTROL_TIMEOUT = datetime.timedelta(days=7)


class WorkerDiedError(RuntimeError):
    """A rank went away (or failed) while the engine needed it."""


def env_rank_info(config: EngineConfig) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the environment, checked against the config."""
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise ValueError(f"multi-node tensor parallelism reads {', '.join(ENV_VARS)} from the "
                         f"environment; missing: {', '.join(missing)}")
    rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    tp = config.parallel_config.world_size
    if world < 2:
        raise ValueError(f"FOLOVLLM_DISTRIBUTED=env is for 2 or more ranks (WORLD_SIZE={world}); "
                         "unset it to run on one device")
    if world != tp:
        raise ValueError(f"WORLD_SIZE={world} but tensor_parallel_size={tp}: they must be equal")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world, local


def config_fingerprint(config: EngineConfig) -> dict[str, Any]:
    """The settings every rank must agree on (each rank builds its config from its own flags)."""
    mc, cc, sc = config.model_config, config.cache_config, config.scheduler_config
    return {"tensor_parallel_size": config.parallel_config.tensor_parallel_size,
            "architecture": (getattr(mc.hf_config, "architectures", None) or ["?"])[0],
            "dtype": str(mc.dtype), "max_model_len": mc.max_model_len, "seed": mc.seed,
            "block_size": cc.block_size, "max_num_seqs": sc.max_num_seqs,
            "max_num_batched_tokens": sc.max_num_batched_tokens,
            "device_type": config.torch_device().type, "enforce_eager": config.enforce_eager}


def start_rank(config: EngineConfig, rank: int, local_rank: int):
    """Join the world through env://, load this rank's shard, and create the control group.
    Every rank calls this, in the same order of collectives. Returns (worker, control group,
    [(host, pid)] per rank)."""
    import torch.distributed as dist

    from folovllm.worker.worker import Worker

    worker = Worker(config, rank=rank, local_rank=local_rank, distributed_init_method="env://")
    worker.init_device()
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    # Compare settings before loading weights: a mismatch fails on every rank, with both sides.
    # Where each rank runs travels with it, for rank 0's error messages should one go away.
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (config_fingerprint(config), (socket.gethostname(), os.getpid())),
                           group=control)
    prints = [g[0] for g in gathered]
    diff = {k: [p[k] for p in prints] for k in prints[0] if any(p[k] != prints[0][k] for p in prints)}
    if diff:
        raise ValueError("the ranks were started with different engine settings "
                         f"(setting: value per rank): {diff}; pass the same flags to every rank")
    worker.load_model()
    return worker, control, [g[1] for g in gathered]


def broadcast(msg, group) -> Any:
    import torch.distributed as dist

    box = [msg]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def gather(value, group) -> list[Any] | None:
    import torch.distributed as dist

    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, out, dst=0, group=group)
    return out


class _Done:
    """A step that already ran: result() returns its output."""

    def __init__(self, out: ModelRunnerOutput) -> None:
        self._out = out

    def result(self) -> ModelRunnerOutput:
        return self._out


def _send_shutdown(state: dict) -> None:
    """Tell the other ranks to exit and leave torch.distributed (once; no executor reference, so
    weakref.finalize can run it at interpreter exit)."""
    if state.get("closed"):
        return
    state["closed"] = True
    from folovllm.distributed import parallel_state
    try:
        if not state.get("failed"):
            broadcast(("shutdown",), state["control"])
    except Exception:  # noqa: BLE001  a rank already gone: nothing to tell it
        pass
    try:
        parallel_state.destroy_distributed_environment()
    except Exception:  # noqa: BLE001
        pass


class ExternalRanksExecutor(Executor):
    def _init_executor(self) -> None:
        rank, self.world_size, local_rank = env_rank_info(self.config)
        if rank != 0:
            raise ValueError(f"the engine runs on RANK 0 (this process has RANK={rank}); start the "
                             "other ranks with `folovllm worker`")
        logger.info("rank 0 of %d: waiting for the other ranks at %s:%s", self.world_size,
                    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
        self.driver_worker, control, self._where = start_rank(self.config, 0, local_rank)
        self._state = {"control": control}
        self._finalizer = weakref.finalize(self, _send_shutdown, self._state)
        logger.info("%d tensor-parallel ranks ready", self.world_size)

    def _run(self, msg, local):
        """Broadcast `msg`, then run `local()` on rank 0; a broken collective becomes
        WorkerDiedError (and the engine cannot continue)."""
        if self._state.get("failed"):
            raise WorkerDiedError(f"earlier, {self._state['failed']}; the engine cannot continue")
        if self._state.get("closed"):
            raise WorkerDiedError("the tensor-parallel executor was shut down")
        try:
            broadcast(msg, self._state["control"])
            return local()
        except RuntimeError as e:  # gloo/NCCL: a peer closed its connection, or timed out
            if isinstance(e, WorkerDiedError):
                raise
            self._state["failed"] = f"{self._gone()} went away during {msg[0]} ({type(e).__name__}: {e})"
            raise WorkerDiedError(f"{self._state['failed']}; the engine cannot continue") from e

    def _gone(self) -> str:
        """The rank that broke a collective, as well as rank 0 can tell: with two ranks it is rank
        1; with more, those on this host whose process has ended (a remote one cannot be
        checked), else all of them."""
        others = range(1, self.world_size)
        if self.world_size > 2:
            here = socket.gethostname()
            dead = [r for r in others if self._where[r][0] == here and not _pid_alive(self._where[r][1])]
            others = dead or others
        ranks = [f"rank {r} (pid {self._where[r][1]} on {self._where[r][0]})" for r in others]
        if len(ranks) == 1:
            return f"tensor-parallel {ranks[0]}"
        return f"one of tensor-parallel {', '.join(ranks)}"

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list[Any]:
        args, kwargs = tuple(args), dict(kwargs or {})

        def local():
            return gather(getattr(self.driver_worker, method)(*args, **kwargs), self._state["control"])
        return self._run(("rpc", method, args, kwargs), local)

    def execute_model(self, scheduler_output: SchedulerOutput, non_block: bool = False):
        out = self._run(("step", scheduler_output), lambda: self.driver_worker.execute_model(scheduler_output))
        return _Done(out) if non_block else out

    def shutdown(self) -> None:
        self._finalizer()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    return True


# ---- ranks 1..N-1 ------------------------------------------------------------------------------

def serve_commands(config: EngineConfig) -> int:
    """A non-zero rank's life: join, load, then run rank 0's commands until it says shutdown
    (returns 0) or goes away (returns 1, with a message)."""
    from folovllm.distributed import parallel_state

    rank, world, local_rank = env_rank_info(config)
    if rank == 0:
        raise ValueError("RANK=0 is the engine: run `folovllm generate`/`serve` or LLM(...) there "
                         "with FOLOVLLM_DISTRIBUTED=env; `folovllm worker` is for RANK 1..N-1")
    logger.info("rank %d of %d: joining %s:%s", rank, world, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
    worker, control, _ = start_rank(config, rank, local_rank)
    logger.info("rank %d ready; serving rank 0's commands", rank)
    while True:
        try:
            msg = broadcast(None, control)
        except RuntimeError as e:
            print(f"folovllm worker rank {rank}: rank 0 went away ({type(e).__name__}: {e}); exiting",
                  flush=True)
            return 1
        kind = msg[0]
        if kind == "step":
            worker.execute_model(msg[1])
        elif kind == "rpc":
            _, method, margs, mkwargs = msg
            gather(getattr(worker, method)(*margs, **mkwargs), control)
        elif kind == "shutdown":
            logger.info("rank %d: shutdown from rank 0", rank)
            parallel_state.destroy_distributed_environment()
            return 0
        else:
            raise RuntimeError(f"unknown command {kind!r} from rank 0")
        del msg
