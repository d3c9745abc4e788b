"""Data-parallel helpers for training: no-ops in a single process, collectives when `torch.distributed` is
initialised (e.g. under torchrun)."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn


def is_on() -> bool:
    """Whether a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_on() else 1


def rank() -> int:
    return dist.get_rank() if is_on() else 0


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce `t` in place over the ranks (`op` "sum" or "min") and return it."""
    if is_on():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op])
    return t


def global_min(value: int, device) -> int:
    """The smallest of every rank's `value`."""
    if not is_on():
        return value
    return int(all_reduce(torch.tensor([value], device=default_device(device)), "min"))


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order."""
    if not is_on():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` (rank order)."""
    if not is_on():
        return x
    return torch.cat(all_gather_objects(x.cpu()), 0).to(x.device)


def broadcast_(*tensors: torch.Tensor) -> None:
    """Overwrite `tensors` with rank 0's, in place."""
    if is_on():
        for t in tensors:
            dist.broadcast(t, 0)


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not is_on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def barrier() -> None:
    if is_on():
        dist.barrier()


def global_centered_sq(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over the global batch of `||t_b - mean_b(t)||^2` (mean over all ranks' rows), and the global row
    count. No grad."""
    with torch.no_grad():
        s = torch.cat([t.sum(0), t.new_full((1,), t.shape[0])])  # no host-to-device copy
        all_reduce(s)
        mu = s[:-1] / s[-1]
        ss = (t - mu).pow(2).sum().reshape(1)
        all_reduce(ss)
        return ss[0], s[-1]


def default_device(device=None) -> torch.device:
    """`device`, or this rank's GPU under NCCL, or CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    if is_on() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# The only buffer (BatchTopK's threshold) is set from all-reduced values, identical on every rank, so DDP
# need not broadcast it each forward; torch >= 2.14 names that option `forward_sync_buffers`.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` in DistributedDataParallel (gradients averaged over the ranks) when a group is on."""
    if not is_on():
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, **_NO_BUFFER_SYNC)


@contextlib.contextmanager
def torchrun_group(device) -> Iterator[None]:
    """Under torchrun (`WORLD_SIZE` > 1) with no process group yet: one for the block (NCCL for a CUDA
    `device`, else gloo), torn down when the block ends. Otherwise nothing.

    Every rank tears the group down as soon as the block is over (after a barrier, so that no rank starts
    tearing down while another still finishes a collective); what follows (rank 0 evaluating and writing
    files) runs without the group. A process that used gloo should leave with `os._exit` (see
    `python -m sae_models`): gloo's worker threads can outlive `destroy_process_group()` and abort the
    interpreter's teardown."""
    own = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_on()
    if own:
        dist.init_process_group("nccl" if default_device(device).type == "cuda" else "gloo")
    try:
        yield
        if own:
            dist.barrier()
    finally:
        if own:
            dist.destroy_process_group()

