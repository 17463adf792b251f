"""Scale-out through ``torch.distributed``: one process per rank, launched by ``torchrun``.

``torchrun --nproc-per-node N -m interp ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address; ``ranks(device)`` reads them and, when ``WORLD_SIZE > 1``, joins the process
group (gloo for CPU work, NCCL for CUDA), once per process. Without those variables it returns the
single-process ``Ranks`` whose collectives do nothing, so every job runs unchanged outside torchrun.

Jobs use it in three ways: work is split by rank (harvest shards, slices of a batch, dictionaries
of a sweep); small results are combined with collectives (sums of statistics, gradients); and what
is written once (manifests, checkpoints, metrics) is written by rank 0, whose checks are shared
with the other ranks (``Ranks.on_main``) so that a refused job stops every rank with the same
message instead of leaving them waiting.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from interp import errors

T = TypeVar("T")
# Rank 0 may spend long in work the others wait for (a harvest before training, evaluation).
TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def device(self, device: str) -> str:
        """``cuda`` becomes this rank's GPU (``cuda:LOCAL_RANK``); anything else is kept."""
        return f"cuda:{self.local_rank}" if self.active and device == "cuda" else device

    # ------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` in place over the ranks (``sum``, ``max`` or ``min``); returns it."""
        if self.active:
            ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
                   "min": torch.distributed.ReduceOp.MIN}
            torch.distributed.all_reduce(tensor, op=ops[op])
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[world_size, *shape]: every rank's ``tensor`` (same shape on every rank)."""
        if not self.active:
            return tensor[None]
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, tensor.contiguous())
        return torch.stack(out)

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` (a small JSON-like object) on every rank."""
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (small objects), in rank order, on every rank."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, value)
        return out

    def on_main(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0 and give its result to every rank; if it raises an interp error
        (bad input, a locked store), every rank raises the same error, so none is left waiting."""
        if not self.active:
            return work()
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", work())
            except errors.InterpError as err:
                outcome = (type(err).__name__, str(err))
            except BaseException as err:  # noqa: BLE001 - re-raised below after telling the others
                self.broadcast(("RuntimeError", f"rank 0 failed: {type(err).__name__}: {err}"))
                raise
        kind, payload = self.broadcast(outcome)
        if kind != "ok":
            raise getattr(errors, kind, RuntimeError)(payload)
        return payload

    # --------------------------------------------------- gradients (data-parallel)
    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the ranks, in one flat all-reduce.

        A parameter without a gradient on every rank keeps none (so the optimizer skips it, as in
        one process); one with a gradient on some ranks only gets the sum of those. Sparse-layout
        gradients are summed densely and kept dense (see the README: interp's kernels compute
        gradients sparsely but store them dense, and almost every latent row is touched per step).
        """
        if not self.active:
            return
        params = [p for p in params]
        if not params:
            return
        grads = [None if p.grad is None else p.grad.to_dense() if p.grad.is_sparse else p.grad for p in params]
        like = params[0].detach()
        flat = torch.cat([g.reshape(-1) if g is not None else like.new_zeros(p.numel()) for g, p in zip(grads, params)]
                         + [like.new_tensor([float(g is not None) for g in grads])])
        self.all_reduce(flat)
        present = flat[-len(params):] > 0
        offset = 0
        for p, has in zip(params, present.tolist()):
            p.grad = flat[offset: offset + p.numel()].view_as(p) if has else None
            offset += p.numel()


SINGLE = Ranks()
_initialised: Ranks | None = None


def ranks(device: str = "cpu") -> Ranks:
    """This process's ``Ranks`` from torchrun's environment, joining the process group on first use
    (gloo for a CPU ``device``, NCCL for CUDA). A process group set up by the caller is used as is."""
    global _initialised
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return Ranks(dist.get_rank(), dist.get_world_size(), local)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if not dist.is_available():
        raise errors.InputError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if _initialised is not None:
        return _initialised
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise errors.InputError(f"device {device!r} but no CUDA device is visible to rank {rank}")
        torch.cuda.set_device(local)
    # With CUDA, CUDA tensors go through NCCL and CPU tensors (objects, CPU-side statistics) through gloo.
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=TIMEOUT)
    _initialised = Ranks(rank, world, local)
    return _initialised


def close_process_group() -> None:
    """Leave the process group this module joined (the CLI does after every job), so a worker
    does not exit with collectives still being torn down; a group the caller set up is kept."""
    global _initialised
    if _initialised is not None and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _initialised = None


def shares(n: int, parts: int) -> list[tuple[int, int]]:
    """``n`` items split into ``parts`` contiguous (start, stop) ranges, sizes differing by at most one."""
    base, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (i < extra))
    return list(zip(bounds[:-1], bounds[1:]))


__all__ = ["SINGLE", "Ranks", "close_process_group", "ranks", "shares"]
