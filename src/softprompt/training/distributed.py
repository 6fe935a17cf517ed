"""Data-parallel prompt training on torch.distributed (``torchrun`` or ``accelerate launch``).

Every rank holds the frozen model and the same prompt. Each global batch (the same on every
rank: same seed, same order) is split into contiguous shards, one per rank; each rank backprops
``sum of its losses / global count`` and the prompt's gradient (kilobytes) is all-reduced with a
sum, so the step equals a single-process step on the whole batch. Evaluation is split across
ranks and the scores are gathered (with a sharded base every rank runs it whole:
`inference_context`). Rank 0 alone writes checkpoints, logs and the report.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job; ``world_size == 1`` means single-process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's contiguous share of ``items`` (sizes differ by at most one); all of them
        in a context of one process."""
        if not self.enabled:
            return items
        base, extra = divmod(len(items), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return items[start : start + base + (1 if self.rank < extra else 0)]


SINGLE = DistContext()  # a single-process run


def inference_context(context: DistContext, sharded_base: bool) -> DistContext:
    """How no-grad work (evaluation, teacher scoring) is shared out among the ranks.

    Normally each rank takes a share of the examples and the results are gathered. With a
    sharded frozen base (``--shard-base``) every forward gathers each block's weights from all
    ranks, so the ranks must run the same forwards in the same order; how many an evaluation
    runs depends on its examples (their lengths, when a generation ends), so each rank runs the
    whole split itself: a context of one process that keeps the rank, so that rank 0 alone
    shows progress.
    """
    return DistContext(context.rank, 1, context.local_rank) if sharded_base else context


def world_from_environment() -> DistContext:
    """Read RANK / WORLD_SIZE / LOCAL_RANK as set by torchrun and accelerate."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    return DistContext(
        int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0"))
    )


def init_distributed(device: torch.device, timeout_seconds: float) -> DistContext:
    """Join the process group if launched by torchrun/accelerate; a no-op otherwise.

    The backend is NCCL for CUDA and gloo for CPU. The timeout bounds every collective, so a rank
    that dies makes the others stop with an error instead of hanging forever.
    """
    context = world_from_environment()
    if not context.enabled or dist.is_initialized():
        return context
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available() or (backend == "nccl" and not dist.is_nccl_available()):
        raise ValueError(
            f"torch.distributed backend {backend!r} is not available in this torch build"
        )
    if device.type == "cuda":
        torch.cuda.set_device(context.local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_seconds))
    logger.info("rank %d of %d joined (%s backend)", context.rank, context.world_size, backend)
    return context


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM (``layers`` for Llama/Gemma, ``h`` for GPT-2)."""
    body = model.base_model
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")


def shard_frozen_base(model: torch.nn.Module, context: DistContext) -> int:
    """Shard each frozen decoder block across ranks with FSDP2 (``fully_shard``).

    Each rank keeps 1/world of every block's weights and gathers a block only while it runs. The
    embeddings, final norm and LM head stay replicated: the prompt's init, the verbalizer rows and
    the prompt (fp32, replicated, its gradient all-reduced by the loop) read them directly.

    Returns:
        The number of blocks sharded.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not context.enabled:
        raise ValueError(
            "shard_base needs several processes: launch with torchrun --nproc_per_node N"
        )
    device_type = next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (context.world_size,))
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    # The decoder body (what the fast path calls) as the root: a block that is a root of its own
    # keeps its gathered weights after a forward until a backward, so an evaluation would end
    # with every block whole on every rank. The body's own weights (embeddings, final norm) are
    # left as they are.
    body = model.base_model
    in_blocks = {id(parameter) for parameter in layers.parameters()}
    fully_shard(body, mesh=mesh, ignored_params={
        parameter for parameter in body.parameters() if id(parameter) not in in_blocks
    })
    return len(layers)


def check_batch_divisible(batch_size: int, context: DistContext) -> None:
    if context.enabled and batch_size % context.world_size:
        raise ValueError(
            f"batch_size={batch_size} (the global batch) is not divisible by the world size "
            f"{context.world_size}; use a multiple of {context.world_size}"
        )


def all_reduce_sum(value: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Sum a tensor over ranks, in place (identity when single-process)."""
    if context.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def gather_rows(local: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Concatenate each rank's ``(rows_r, C)`` tensor in rank order (shards from `shard`)."""
    if not context.enabled:
        return local
    pieces: list[Any] = [None] * context.world_size
    dist.all_gather_object(pieces, local.cpu())
    return torch.cat(pieces, dim=0)


def gather_objects(local: list[Any], context: DistContext) -> list[Any]:
    """Concatenate each rank's list in rank order (shards from `shard`), e.g. generated texts."""
    if not context.enabled:
        return local
    pieces: list[Any] = [None] * context.world_size
    dist.all_gather_object(pieces, list(local))
    return [item for piece in pieces for item in piece]


def broadcast_object(value: Any, context: DistContext) -> Any:
    """Rank 0's value on every rank."""
    if not context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(context: DistContext) -> None:
    if context.enabled:
        dist.barrier()


def shutdown(context: DistContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()
