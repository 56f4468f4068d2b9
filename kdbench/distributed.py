"""One run trained data-parallel on several processes (``torchrun --nproc_per_node N -m kdbench run …``).

torchrun starts N processes and sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each. Every process joins
one process group (gloo on CPU, nccl on GPU, one GPU per process), iterates the same global batches and trains
on its contiguous shard of each; DDP averages the gradients, so the weights stay identical on every process.
Process 0 alone measures, writes the record and logs to MLflow. Without torchrun (``WORLD_SIZE`` unset or 1)
nothing here does anything: a plain run is one process, as before.

Batch norm keeps per-process statistics (DDP's default; process 0's running statistics are broadcast at each
step): ``torch.nn.SyncBatchNorm`` refuses CPU tensors in this torch, so a model with batch norm trains close to,
not exactly as, one process at the same global batch. Models without it match up to float summation order.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kdbench.errors import KdbenchError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int  # index of the process on its machine: its GPU
    backend: str  # "gloo" (CPU) or "nccl" (GPU)

    @property
    def device(self) -> str:
        return f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"


def launched_world_size() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str) -> Ranks | None:
    """Under torchrun with several processes: join the process group (nccl when ``device`` is a GPU, each
    process on GPU ``LOCAL_RANK``; gloo otherwise) and return this process's ranks. None for a single process."""
    world_size = launched_world_size()
    if world_size == 1:
        return None
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)  # rendezvous from torchrun's MASTER_ADDR / MASTER_PORT
    return Ranks(dist.get_rank(), world_size, local_rank, backend)


def leave() -> None:
    """Destroy the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main(ranks: Ranks | None) -> bool:
    """Whether this process reports: rank 0, or the only process."""
    return ranks is None or ranks.rank == 0


def barrier(ranks: Ranks | None) -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if ranks is not None:
        dist.barrier()


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """Each process's share of a global batch; a batch that does not split evenly → one line naming the fix."""
    if global_batch % world_size:
        raise KdbenchError(f"batch_size {global_batch} (the global batch) does not split across {world_size} "
                           f"processes; use a multiple of {world_size} or another --nproc_per_node")
    return global_batch // world_size


def shard(ranks: Ranks | None, *batch: torch.Tensor | None) -> tuple:
    """This process's contiguous chunk of each tensor of a global batch (all of it in a single process)."""
    if ranks is None:
        return batch
    n = len(batch[-1]) // ranks.world_size
    return tuple(None if t is None else t[ranks.rank * n : (ranks.rank + 1) * n] for t in batch)


def mean_over_ranks(ranks: Ranks | None, values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the processes (every process passes the same keys in the same order); a NaN or
    infinite value on one process makes the average NaN or infinite on all."""
    if ranks is None:
        return values
    total = torch.tensor(list(values.values()), dtype=torch.float64, device=ranks.device)
    dist.all_reduce(total)
    return dict(zip(values, (total / ranks.world_size).tolist()))


def data_parallel(module: nn.Module, ranks: Ranks, ignore: Iterable[str] = ()) -> nn.Module:
    """``module`` wrapped in DDP: the gradients of its parameters are averaged across processes in backward.
    ``ignore`` names parameters and buffers that stay local. A step may leave some parameters unused (a
    method's schedule), so DDP looks for them every step."""
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, list(ignore))
    # a weight with a dimension of size 1 (a conv on one input channel) has a stride there that its gradient
    # does not share; DDP copies it correctly and warns at every run
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    device_ids = [ranks.local_rank] if ranks.backend == "nccl" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)
