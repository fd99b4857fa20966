"""Data parallelism for the trainer: torch DistributedDataParallel driven by ``accelerate``.

Launch one process per GPU (or CPU slot) with ``accelerate launch`` or ``torchrun``: they set RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT, and ``Accelerator`` joins the process group (NCCL on GPUs, gloo on CPUs).
A process group the caller initialized itself is adopted. Without any of this the run is a single process: then
accelerate is not needed (nor imported) and every method below is a no-op.

Gradients are **summed** over processes (a DDP communication hook; DDP would average): the trainer already divides
each process's loss by the token count of the whole global batch, so the sum is the gradient of the global batch —
the same as one process computing it, up to the order of floating-point additions.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError


def _sum_gradients(state, bucket):  # no annotations: DDP checks them against the real classes
    """DDP communication hook: all-reduce (sum) a gradient bucket without DDP's division by the world size."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def launched_world_size() -> int:
    """How many processes this run was launched with (1 when not launched by torchrun / accelerate launch / mpirun,
    nor inside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    names = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    return max([int(os.environ.get(n, "1") or 1) for n in names])


def _adopt_process_group() -> None:
    """Describe a process group the caller initialized (e.g. ``mp.spawn`` + ``init_process_group``) in the
    environment variables accelerate reads, as torchrun would have."""
    if dist.is_available() and dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK=str(dist.get_rank()), WORLD_SIZE=str(dist.get_world_size()),
                          LOCAL_RANK=os.environ.get("LOCAL_RANK", str(dist.get_rank())))


class Parallel:
    """The trainer's view of the processes: ``rank`` / ``world``, wrapping the model for DDP, gradient sync only on a
    step's last micro-batch, and the few collectives the loop needs (sums, barriers, gathering RNG states)."""

    def __init__(self, device: torch.device):
        self.device, self.accelerator = device, None
        self.rank, self.world = 0, 1
        if launched_world_size() == 1:
            return
        try:
            from accelerate import Accelerator  # optional [train] extra, needed only with several processes
            from accelerate.utils import DistributedDataParallelKwargs  # (the same)
        except ImportError:
            raise ConfigError("training on several processes needs accelerate: pip install 'compactvl[train]' "
                              "(or pip install accelerate)") from None
        _adopt_process_group()
        self.accelerator = Accelerator(
            cpu=device.type == "cpu", device_placement=False,
            # trainable parameters may get no gradient in a step (e.g. an expert no token was routed to);
            # buffers (e.g. fitted standardization) are equal on every process: no need to broadcast them per step
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)])
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        if self.world != launched_world_size():
            raise ConfigError(f"accelerate sees {self.world} process(es) of the {launched_world_size()} launched; "
                              "launch with accelerate launch or torchrun (they set RANK, WORLD_SIZE, LOCAL_RANK)")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to run forward/backward through: ``model`` itself on one process, else DDP around it (built
        after the trainable parameters are final, e.g. after LoRA injection) with gradients summed."""
        if self.world == 1:
            return model
        with warnings.catch_warnings():  # torch >= 2.10 deprecates broadcast_buffers=False for an option that
            # still syncs buffers at init; they are equal on every process here, so either is right
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated", category=FutureWarning)
            ddp = self.accelerator.prepare_model(model, device_placement=False)
        ddp.register_comm_hook(None, _sum_gradients)
        return ddp

    @contextlib.contextmanager
    def sync(self, wrapped: nn.Module, last: bool) -> Iterator[None]:
        """Around a micro-batch's forward and backward: gradients are all-reduced only on the ``last`` micro-batch
        of a step (earlier ones accumulate locally)."""
        no_sync = getattr(wrapped, "no_sync", None)
        with (contextlib.nullcontext() if last or no_sync is None else no_sync()):
            yield

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over processes (returned on the CPU)."""
        if self.world == 1:
            return t
        on = t.to(self.device)  # NCCL reduces device tensors only
        dist.all_reduce(on)
        return on.cpu()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process."""
        return flag if self.world == 1 else bool(self.sum(torch.tensor([1.0 if flag else 0.0])).item() > 0)

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def gather_object(self, obj: Any) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every process."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object  # only reached with several processes (accelerate imported)

        return list(gather_object([obj]))
