"""Several processes under torchrun (torch.distributed): which one this is, and sharing work among them.

`torchrun --nproc_per_node=N -m editcore ...` starts N copies of a command and sets RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE and the rendezvous address in each one's environment; without them a
command runs as the only rank. `Ranks.from_env()` reads them; `joined` connects the ranks (gloo on
CPU, nccl on CUDA), `share` splits a list of work items and `gather` brings the results to rank 0.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launched: bool = False  # started by torchrun (even as its only process): join a process group

    @classmethod
    def from_env(cls) -> Ranks:
        """This process's place among torchrun's processes; the only rank when torchrun did not start it."""
        if "WORLD_SIZE" not in os.environ:
            return cls()
        world_size = int(os.environ["WORLD_SIZE"])
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        return cls(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", 0)), local_world_size, True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """A bare 'cuda' becomes this rank's own GPU (cuda:LOCAL_RANK); any other device stays as asked."""
        if device.type == "cuda" and device.index is None and self.launched:
            return torch.device("cuda", self.local_rank)
        return device

    def default_threads(self) -> int:
        """This machine's cores split evenly among the ranks on it."""
        return max(1, available_cores() // self.local_world_size)

    @contextlib.contextmanager
    def joined(self, device: torch.device, threads: int = 0) -> Iterator[Ranks]:
        """Torch threads (`threads`, else the default share under torchrun), and under torchrun the process
        group for the duration: nccl on CUDA, gloo on CPU."""
        if threads or self.launched:
            torch.set_num_threads(threads or self.default_threads())
        if not self.launched:
            yield self
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=self.rank, world_size=self.world_size,
                                device_id=device if device.type == "cuda" else None)
        try:
            yield self
        finally:
            dist.destroy_process_group()

    def share(self, n_items: int) -> range:
        """This rank's positions among `n_items`: every world_size-th one, from its rank on."""
        return range(self.rank, n_items, self.world_size)

    def gather(self, positions: list[int], items: list) -> list | None:
        """Every rank's items on rank 0, ordered by position (as one process would have made them); None
        on the other ranks. Items travel pickled between this job's own processes."""
        if not dist.is_initialized():
            return list(items)
        parts = [None] * self.world_size if self.is_main else None
        dist.gather_object(list(zip(positions, items)), parts, dst=0)
        if not self.is_main:
            return None
        return [item for _, item in sorted((pair for part in parts for pair in part), key=lambda pair: pair[0])]
