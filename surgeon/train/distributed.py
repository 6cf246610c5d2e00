"""Process group and model wrapping: `torchrun` ranks, activation checkpointing, DDP or FSDP2, gradient sync and all-reduce.

Separate from the loop because these helpers are where one process, DDP and FSDP2 differ.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from surgeon.errors import TrainingError
from surgeon.train.evaluate import choose_device

if TYPE_CHECKING:
    from surgeon.train.trainer import TrainConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a `torchrun` launch; world size 1 without one."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def start_process_group(requested_device: str) -> ProcessGroup:
    """Join the `torchrun` process group when WORLD_SIZE is set: NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(requested_device, local_rank)

    if world_size > 1 and not dist.is_initialized():
        # NOTE: the tests run only the gloo/CPU branch; the NCCL branch has not been run on a GPU yet.
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        logger.info("joined process group: rank %d of %d on %s", rank, world_size, device)
    return ProcessGroup(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each decoder layer in the backward pass, with non-reentrant checkpointing.

    Non-reentrant checkpointing still sends gradients to trainable layers when the
    layer inputs need none, as with frozen embeddings under `--train new`.
    transformers 5 renamed the method, so both names are tried.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def wrap_model(model: torch.nn.Module, config: TrainConfig, group: ProcessGroup, autocast_dtype: torch.dtype | None) -> torch.nn.Module:
    """Move the model to its device and wrap it in FSDP2 (`--fsdp`) or DDP (several processes)."""
    if config.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():
            raise TrainingError("--fsdp needs a process group", field="fsdp", fix="launch with torchrun")

        mesh = init_device_mesh(group.device.type, (group.world_size,))
        mixed_precision = MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32)
        # fully_shard moves each shard to the mesh device, so the full model never sits on one accelerator.
        # NOTE: every process still loads the full float32 model into CPU memory before sharding it.
        for layer in model.get_submodule("model.layers"):
            fully_shard(layer, mesh=mesh, mp_policy=mixed_precision)
        fully_shard(model, mesh=mesh, mp_policy=mixed_precision)
        return model

    model.to(group.device)
    if group.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [group.device.index] if group.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    return model


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Return the Hugging Face model inside a DDP wrapper; FSDP2 shards in place and needs no unwrapping."""
    return getattr(model, "module", model)


def gradient_sync(model: torch.nn.Module, sync: bool) -> Any:
    """Return a context that skips the gradient all-reduce on accumulation micro-steps that are not the last."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
        return nullcontext()
    if hasattr(model, "no_sync") and not sync:
        return model.no_sync()
    return nullcontext()


def all_reduce_mean(value: torch.Tensor, group: ProcessGroup) -> float:
    """Average a scalar over all processes."""
    if group.world_size > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= group.world_size
    return value.item()
