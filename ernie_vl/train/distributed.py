"""Distributed training: process group from torchrun's environment, DDP, PowerSGD with measured compression.

* :func:`init_distributed` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (set by
  ``torchrun``) and initialises NCCL on CUDA or gloo on CPU; one process without
  those variables runs plainly.
* :func:`wrap_model` wraps in DDP (or shards with FSDP2, see :mod:`ernie_vl.train.fsdp`), and with ``powersgd_rank`` > 0 registers
  PyTorch's PowerSGD communication hook behind :class:`PowerSGDMeter`, which counts
  the gradient elements each bucket would send uncompressed and the elements PowerSGD
  actually all-reduces (the P and Q factors plus the tensors it leaves uncompressed),
  so the log reports the measured compression ratio (BRIEF.md #5 claims 32x).
* :func:`torchrun_command` builds the launcher command for ``ernie-vl train --nproc N``.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    """Where this process stands: rank, world size, device, backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(device: Optional[str] = None) -> DistContext:
    """Join the process group described by torchrun's environment (no-op for one process)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistContext(device=dev)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        # a rank outside the world would wait forever for a rendezvous that never completes
        if "RANK" not in os.environ or not 0 <= rank < world:
            raise ValueError(f"RANK={os.environ.get('RANK', '<unset>')} with WORLD_SIZE={world}: RANK must be "
                             f"an integer in 0..{world - 1} (launch with torchrun, which sets both)")
        dist.init_process_group(backend=backend)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=dev, backend=backend)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_cat(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank in rank order (no gradient)."""
    if not ctx.distributed:
        return x
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def broadcast_object(value: Any, ctx: DistContext) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any, ctx: DistContext) -> list[Any]:
    """``value`` of every rank, in rank order, on every rank."""
    if not ctx.distributed:
        return [value]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


class _AtLeast1D:
    """A GradBucket whose ``gradients()`` shows 0-d gradients as (1,) views of the same memory.

    PyTorch's ``powerSGD_hook`` reads ``tensor.shape[0]`` of every gradient and fails on
    scalar parameters (our logit scale); a (1,) view is left uncompressed, as a vector is.
    """

    def __init__(self, bucket) -> None:
        self._bucket = bucket

    def gradients(self):
        return [g.view(1) if g.ndim == 0 else g for g in self._bucket.gradients()]

    def __getattr__(self, name: str):
        return getattr(self._bucket, name)


class PowerSGDMeter:
    """PowerSGD communication hook that measures gradient traffic.

    Per step (``take_step_counts()``): ``dense`` = gradient elements handed to the hook
    (what plain all-reduce sends), ``sent`` = elements actually all-reduced (the whole
    bucket during warm-up; afterwards the P and Q factors plus uncompressed tensors, as
    PowerSGD itself tallies them). The ratio ``dense / sent`` is the compression.
    """

    def __init__(self, rank: int, warmup_steps: int, process_group=None, serialize: bool = False) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        if rank < 1:
            raise ValueError(f"PowerSGD rank must be >= 1, got {rank}")
        self._hook = psgd.powerSGD_hook
        # error feedback and warm start need at least 2 uncompressed steps (a PyTorch requirement)
        self.state = psgd.PowerSGDState(process_group=process_group, matrix_approximation_rank=rank,
                                        start_powerSGD_iter=max(2, warmup_steps), use_error_feedback=True,
                                        warm_start=True, random_seed=0)
        self.serialize = serialize
        self.step_compressed = False
        self.dense = 0
        self.sent = 0
        self.total_dense = 0
        self.total_sent = 0

    def hook(self, state, bucket):  # signature required by register_comm_hook
        numel = bucket.buffer().numel()
        compressing = state.iter >= state.start_powerSGD_iter
        before = state.total_numel_after_compression
        future = self._hook(state, _AtLeast1D(bucket))
        if self.serialize:
            # gloo matches collectives by issue order; PowerSGD chains 2-3 all-reduces per bucket in
            # callbacks, which two buckets can interleave differently on two ranks (a collective
            # mismatch, seen here); finishing each bucket before the next keeps the order identical
            future.wait()
        sent = state.total_numel_after_compression - before if compressing else numel
        self.dense += numel
        self.sent += sent
        self.step_compressed = self.step_compressed or compressing
        return future

    @property
    def compressing(self) -> bool:
        return self.state.iter >= self.state.start_powerSGD_iter

    def take_step_counts(self) -> dict[str, float]:
        """This step's counts (then reset): dense and sent elements, their ratio, bytes at float32."""
        out = {"grad_elements_dense": self.dense, "grad_elements_sent": self.sent,
               "compression_ratio": self.dense / self.sent if self.sent else 1.0, "compressing": self.step_compressed}
        self.total_dense += self.dense
        self.total_sent += self.sent
        self.dense = self.sent = 0
        self.step_compressed = False
        return out


def wrap_model(model: nn.Module, ctx: DistContext, parallel: str = "ddp", powersgd_rank: int = 0,
               powersgd_warmup: int = 10, ignore: Sequence[str] = ()) -> tuple[nn.Module, Optional[PowerSGDMeter]]:
    """DDP around ``model``, or FSDP2 (``fully_shard``) on it, when distributed; PowerSGD hook when asked
    (DDP only). FSDP2 replaces the parameters: build the optimiser after this call.

    ``ignore``: parameter names DDP neither broadcasts nor averages (expert-parallel experts, which
    differ per rank and are reduced by :func:`ernie_vl.moe.expert_parallel.sync_expert_grads`)."""
    if powersgd_rank and parallel == "fsdp":
        raise ValueError("PowerSGD is a DDP communication hook and cannot be used with FSDP "
                         "(FSDP reduce-scatters sharded gradients); use parallel='ddp' or powersgd_rank=0")
    if not ctx.distributed:
        return model, None
    if parallel == "fsdp":  # FSDP2, per block then the root (in place: build the optimiser after this)
        from ernie_vl.train.fsdp import shard_model

        return shard_model(model, ctx), None
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    if ignore:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(ignore))
    # find_unused_parameters: an expert that receives no token, or a modality absent from a
    # step, leaves parameters without gradient
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)
    meter = None
    if powersgd_rank:
        meter = PowerSGDMeter(powersgd_rank, powersgd_warmup, serialize=ctx.backend == "gloo")
        ddp.register_comm_hook(meter.state, meter.hook)
    return ddp, meter


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (torchrun's rendezvous, the HTTP server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def torchrun_command(nproc: int, args: list[str], port: Optional[int] = None,
                     module: str = "ernie_vl.train") -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node N ... -m MODULE ARGS`` on one machine."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()), "-m", module, *args]
