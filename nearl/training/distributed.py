"""The per-rank logic of multi-process training, kept small.

Launch with `torchrun --nproc_per_node=N -m nearl.train ...`: torchrun sets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT, and `init()` builds the process group from them (NCCL when
CUDA is available, gloo on CPU). Without those variables everything here is a no-op for one process.

Data order is a pure function of (seed, epoch): `ShardedBatchSampler` shuffles all indices with a
generator seeded by (seed, epoch), cuts them into global batches of per-rank batch x world size,
and gives rank r the r-th slice of each global batch. One process with batch B x N therefore sees
exactly the batches N processes with batch B see together (in rank order, the order in which
ClipLoss gathers features), and a resumed run restarts mid-epoch by skipping whole batches.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from nearl.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: Optional[str] = None, timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this rank's device.

    device: "cpu", "cuda", or None (CUDA when available). Under torchrun with CUDA each rank uses
    cuda:LOCAL_RANK and the NCCL backend; on CPU the gloo backend.
    """
    want_cuda = torch.cuda.is_available() if device in (None, "auto") else str(device).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for CUDA, but torch sees no GPU")
    world_size = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        if world_size > 1:
            index = local_rank
        elif device not in (None, "auto") and torch.device(device).index is not None:
            index = torch.device(device).index
        else:
            index = 0
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if want_cuda else "gloo"
        kwargs = {"timeout": datetime.timedelta(minutes=timeout_minutes)}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks (a copy; the input is untouched). Identity for one process."""
    if not info.distributed:
        return values.detach().clone()
    out = values.detach().to(info.device, copy=True)  # NCCL reduces CUDA tensors only
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return (out / info.world_size).to(values.device)


def all_reduce_min(value: int, info: DistInfo) -> int:
    """The smallest `value` over ranks (used to cut every rank's batch to the same size)."""
    if not info.distributed:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def broadcast_object(obj, info: DistInfo):
    """rank 0's `obj` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mix_seed(*numbers: int) -> int:
    """A well-spread 63-bit seed from a few integers (stable across runs and platforms)."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class ShardedBatchSampler:
    """Deterministic, resumable, rank-sharded batches (a DataLoader `batch_sampler`).

    Epoch e's order is randperm(n) from a generator seeded by (seed, e) (or 0..n-1 without
    shuffle); global batch i is order[i*G:(i+1)*G] with G = batch_size * world_size, and rank r gets
    its slice [r*batch_size:(r+1)*batch_size]. The last incomplete global batch is dropped when
    `drop_last` (training: every rank must contribute the same number of samples to the gathered
    contrastive loss). `set_epoch(e, start=k)` starts epoch e at global batch k (resume).
    """

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.n, self.batch_size, self.rank, self.world_size = int(n), int(batch_size), rank, world_size
        self.seed, self.shuffle, self.drop_last = int(seed), shuffle, drop_last
        self.epoch, self.start = 0, 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.n, self.global_batch)
        return full if self.drop_last or rest == 0 else full + 1

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def order(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[List[int]]:
        order = self.order(self.epoch)
        g = self.global_batch
        for i in range(self.start, self.batches_per_epoch()):
            chunk = order[i * g:(i + 1) * g]
            yield chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "start": self.start, "n": self.n,
                "batch_size": self.batch_size, "world_size": self.world_size, "shuffle": self.shuffle}
