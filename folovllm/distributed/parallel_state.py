"""The tensor-parallel group: which rank this process is, how many ranks share each layer, and
the collectives that join their partial results.

Nothing initialized means one rank (size 1, rank 0) and collectives that return their input, so
building and running a model on one device needs no setup. With several ranks the executor calls,
in every worker process:

    init_distributed_environment(world_size, rank, "tcp://host:port")   # torch.distributed
    initialize_model_parallel(tensor_model_parallel_size)

and model layers read get_tensor_model_parallel_world_size() / _rank() while they are built.
`fake_tensor_model_parallel(size, rank)` lets a test build and load one rank's shard in a
single process; any collective called under it raises, since there is no group to talk to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class GroupCoordinator:
    """One process group and this process's place in it."""

    world_size: int
    rank: int  # within the group
    ranks: list[int] = field(default_factory=lambda: [0])  # global ranks of the members
    device_group: dist.ProcessGroup | None = None
    local_rank: int = 0
    fake: bool = False  # set by fake_tensor_model_parallel: shapes only, no communication

    def _check_can_communicate(self, op: str) -> None:
        if self.fake:
            raise RuntimeError(f"{op} was called under fake_tensor_model_parallel({self.world_size}, "
                               f"{self.rank}), which only builds and loads shards; run real ranks "
                               "(init_distributed_environment + initialize_model_parallel) to execute")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the group, in place in x (x is returned)."""
        if self.world_size == 1:
            return x
        self._check_can_communicate("all_reduce")
        dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The members' tensors concatenated along dim, in rank order."""
        if self.world_size == 1:
            return x
        self._check_can_communicate("all_gather")
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.device_group)
        return torch.cat(parts, dim=dim)


_SINGLE = GroupCoordinator(world_size=1, rank=0)
_WORLD: GroupCoordinator | None = None
_TP: GroupCoordinator | None = None


def init_distributed_environment(world_size: int = 1, rank: int = 0, distributed_init_method: str | None = None,
                                 local_rank: int = 0, backend: str | None = None) -> None:
    """Join the world of `world_size` processes. One process needs no torch.distributed at all;
    otherwise the backend defaults to NCCL where CUDA is available and gloo elsewhere (CPU)."""
    global _WORLD
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if world_size == 1 and not dist.is_initialized():
        _WORLD = GroupCoordinator(1, 0, [0], None, local_rank)
        return
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; tensor parallelism needs it")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend, init_method=distributed_init_method or "env://",
                                world_size=world_size, rank=rank)
    elif dist.get_world_size() != world_size:
        raise RuntimeError(f"torch.distributed is already initialized with world size "
                           f"{dist.get_world_size()}, not {world_size}")
    _WORLD = GroupCoordinator(world_size, dist.get_rank(), list(range(world_size)), dist.group.WORLD, local_rank)


def initialize_model_parallel(tensor_model_parallel_size: int = 1, backend: str | None = None) -> None:
    """Split the world into groups of `tensor_model_parallel_size` consecutive ranks; each group
    holds one copy of the model, 1/size of every sharded layer on each rank."""
    global _TP
    tp = tensor_model_parallel_size
    if _WORLD is None:
        if tp != 1:
            raise RuntimeError("call init_distributed_environment(world_size, rank, ...) before "
                               f"initialize_model_parallel({tp})")
        init_distributed_environment(1, 0)
    world = _WORLD.world_size
    if tp < 1 or world % tp:
        raise ValueError(f"tensor_model_parallel_size ({tp}) must divide the world size ({world})")
    if _TP is not None:
        if _TP.world_size != tp:
            raise RuntimeError(f"tensor parallelism is already initialized with size {_TP.world_size}; "
                               "call destroy_model_parallel() first")
        return
    if world == 1:
        _TP = GroupCoordinator(1, 0, [0], None, _WORLD.local_rank)
        return
    mine = None
    for start in range(0, world, tp):
        ranks = list(range(start, start + tp))
        # Every process must take part in creating every group, even the ones it is not in.
        group = dist.group.WORLD if tp == world else dist.new_group(ranks, backend=backend)
        if _WORLD.rank in ranks:
            mine = GroupCoordinator(tp, ranks.index(_WORLD.rank), ranks, group, _WORLD.local_rank)
    _TP = mine


def model_parallel_is_initialized() -> bool:
    return _TP is not None


def get_tp_group() -> GroupCoordinator:
    """The tensor-parallel group; a size-1 group when nothing was initialized."""
    return _TP if _TP is not None else _SINGLE


def get_tensor_model_parallel_world_size() -> int:
    return get_tp_group().world_size


def get_tensor_model_parallel_rank() -> int:
    return get_tp_group().rank


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    return get_tp_group().all_reduce(x)


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return get_tp_group().all_gather(x, dim)


def destroy_model_parallel() -> None:
    """Forget the tensor-parallel group (and free it, where it is not the world group)."""
    global _TP
    tp, _TP = _TP, None
    if tp is not None and tp.device_group is not None and tp.device_group is not dist.group.WORLD:
        dist.destroy_process_group(tp.device_group)


def destroy_distributed_environment() -> None:
    """destroy_model_parallel, then leave torch.distributed."""
    global _WORLD
    destroy_model_parallel()
    _WORLD = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def fake_tensor_model_parallel(world_size: int, rank: int) -> Iterator[GroupCoordinator]:
    """Act as `rank` of `world_size` tensor-parallel ranks without torch.distributed, to build
    and load that rank's shard of a model in a test. Collectives raise inside."""
    global _TP
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    saved = _TP
    _TP = GroupCoordinator(world_size, rank, list(range(world_size)), None, fake=True)
    try:
        yield _TP
    finally:
        _TP = saved
