r"""Data-parallel training for Pyro's ``fit`` over ``torch.distributed``: one process per device (``torchrun``).

Each of the :math:`W` processes takes its shard (a contiguous :math:`1/W`) of every global minibatch, in the same
global order as one process; its chains run on its shard, its prior chains are its own. The gradients of every
parameter (the model's, the guide's, the normalizers' and the contrastive term's) are summed over the processes
with one ``all_reduce`` per update, so every process applies the same Adam update to the same parameters.

The sum is exact: a process's loss is the sum of its data's terms plus :math:`1/W` of the global terms, so the
processes' losses add up to the loss of the whole minibatch in one process. :class:`ShardScale` does this scaling:
sites in a plate whose size is the process's batch (the data plate) keep their scale; every other site (global
latents, a plate over groups, a subsampled plate whose size is the whole data set) is scaled by :math:`1/W`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from pyro.poutine.messenger import Messenger

__all__ = ["ProcessGroup", "ShardScale", "process_group", "resolve_device"]


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the default ``torch.distributed`` group: ``rank`` of ``world`` processes, and the
    device its collectives' tensors live on (``None``: the CPU, gloo; NCCL needs this process's GPU)."""

    rank: int
    world: int
    device: torch.device | None = None

    @property
    def is_writer(self) -> bool:
        """Whether this process writes checkpoints, the history and the progress bar (rank 0)."""
        return self.rank == 0

    def shard(self, indices, batch_size: int):
        """This process's contiguous part of a global minibatch's ``indices`` (``batch_size // world`` of them)."""
        size = batch_size // self.world
        return indices[self.rank * size:(self.rank + 1) * size]

    def all_reduce_grads(self, params: list[torch.Tensor]) -> None:
        """Sum the gradients of ``params`` (the same list, in the same order, on every process) over the processes,
        in one flat buffer; a parameter without a gradient contributes zeros (and gets the sum)."""
        import torch.distributed as dist

        if not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def agree(self, failed: bool, loss: float, num_params: int) -> tuple[int, float]:
        """One ``all_reduce`` after the loss: ``(processes that failed, the summed loss)``. Raises when the
        processes updated different numbers of parameters (their model took different paths)."""
        import torch.distributed as dist

        values = torch.tensor([float(failed), 0.0 if failed else loss, num_params, num_params ** 2],
                              dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        num_failed, total, n, n2 = values.tolist()
        if n2 * self.world != n * n:
            raise RuntimeError("the processes updated different sets of parameters in this step (their model or "
                               "guide took different paths): under torch.distributed every process must create and "
                               "use the same parameters; make the model's parameters independent of the data shard")
        return int(num_failed), total

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Copy rank 0's values of ``tensors`` (the same list on every process) to every process, in place."""
        import torch.distributed as dist

        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=0)

    def gather_rng(self, state: torch.Tensor) -> list[torch.Tensor]:
        """Every process's torch RNG state (a byte tensor), in rank order."""
        import torch.distributed as dist

        state = state.to(self.device) if self.device is not None else state
        out = [torch.empty_like(state) for _ in range(self.world)]
        dist.all_gather(out, state)
        return [s.cpu() for s in out]


def process_group(device: torch.device | None = None) -> ProcessGroup | None:
    """This process's :class:`ProcessGroup`, or ``None`` for a single process.

    Uses the default ``torch.distributed`` process group if one was initialised; otherwise, when ``torchrun``'s
    environment says ``WORLD_SIZE > 1``, initialises it (``nccl`` for a CUDA ``device``, else ``gloo``).
    """
    import torch.distributed as dist

    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        backend = "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend)
    world = dist.get_world_size()
    return ProcessGroup(dist.get_rank(), world) if world > 1 else None


def resolve_device(device, group: ProcessGroup | None) -> torch.device | None:
    """``fit``'s ``device``: as given; else, under ``nccl``, this process's GPU (``cuda:LOCAL_RANK``); else ``None``
    (torch's default device)."""
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device or its name (e.g. 'cpu', 'cuda', 'cuda:1'), got "
                             f"{device!r}") from None
    if group is not None:
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return None


class ShardScale(Messenger):
    """Scales every sample site that is not in a plate of size ``local_size`` (the data plate on one process's
    shard) by ``1 / world``, so that the processes' losses add up to one process's loss; notes observed sites
    outside that plate (:meth:`check_data_plate`)."""

    def __init__(self, *, local_size: int, world: int):
        super().__init__()
        self.local_size, self.world = int(local_size), int(world)
        self.unplated: set[str] = set()

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        if not any(frame.vectorized and frame.size == self.local_size for frame in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] / self.world
            value = msg["value"]
            if msg["is_observed"] and torch.is_tensor(value) and value.dim() and value.shape[0] == self.local_size:
                self.unplated.add(msg["name"])  # data of the batch, outside the data plate

    def check_data_plate(self) -> None:
        """Refuse observed sites whose values have the batch as their first dimension but that are not in the data
        plate: their terms would be taken for global ones and scaled by 1/W."""
        if self.unplated:
            raise ValueError(f"under torch.distributed, fit needs the data's sites inside a plate over the batch "
                             f"(e.g. `with pyro.plate('data', x.shape[0]):`), which tells per-datum terms from "
                             f"global ones; the observed site(s) {sorted(self.unplated)} are outside any plate of the "
                             f"process's batch size {self.local_size}: put them in one")
