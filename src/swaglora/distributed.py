"""Data parallelism across processes started by ``accelerate launch`` (or ``torchrun``).

The training loop never calls ``model(...)`` (it runs the scorer's top layers on cached lower-layer
outputs), so wrapping the model in DDP would not synchronise anything. Instead each process takes an
equal slice of every global batch and the gradients are averaged explicitly before the optimiser step:
all processes then hold identical weights, and only the main process collects posteriors, writes
checkpoints, logs and saves.

With one process nothing here touches ``torch.distributed`` or creates an ``Accelerator``: every method
is a no-op (or the identity), so single-process training pays nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Dist", "current"]


class Dist:
    """Rank, world size and the few collectives the training loop needs."""

    def __init__(self, accelerator=None) -> None:
        self.accelerator = accelerator
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: Sequence[int]) -> list[int]:
        """This process's contiguous slice of a global batch (sizes differ by at most one)."""
        n = len(rows)
        return list(rows[self.rank * n // self.world : (self.rank + 1) * n // self.world])

    def _all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        # NCCL only reduces device tensors; the library keeps CPU tensors unless a device was chosen
        device = self.accelerator.device if dist.get_backend() == "nccl" else t.device
        buf = t.to(device)
        dist.all_reduce(buf)
        return buf.to(t.device)

    def average_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Replace each gradient by its mean over processes (one flat all-reduce; a missing grad counts as 0)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self._all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / self.world
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
            offset += p.numel()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over processes of a few numbers (float64)."""
        if self.world == 1:
            return list(values)
        return self._all_reduce_sum(torch.tensor(list(values), dtype=torch.float64)).tolist()

    def from_main(self, value: float) -> float:
        """The main process's ``value`` on every process (so decisions taken from it agree everywhere)."""
        return value if self.world == 1 else self.sum([value if self.is_main else 0.0])[0]

    def wait(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()


_CURRENT: Dist | None = None


def current() -> Dist:
    """The process's :class:`Dist`: an Accelerator is created only when launched with several processes."""
    global _CURRENT
    if _CURRENT is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            # without CUDA, accelerate only sets up a (gloo) process group when told it runs on CPU
            cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
            _CURRENT = Dist(Accelerator(cpu=cpu))
        else:
            _CURRENT = Dist()
    return _CURRENT
