"""When each input shard is needed while a Plan is written, and the disk use that implies.

Streamed Hub inputs download an input shard just before the first output tensor
that reads it and delete it right after the last one. The writer goes through
the output shards in order, and through each shard's tensors in order, so that
order fixes every input shard's lifetime. The peak disk use follows from the
plan alone: input shards alive at a tensor, plus the output written so far.
"""

from __future__ import annotations

from dataclasses import dataclass

from surgeon.plan.compile import Plan
from surgeon.plan.expressions import InputShard
from surgeon.plan.sharding import PlannedTensor


@dataclass
class ShardLifetimes:
    """Write order of output tensors and, per input shard, the first and last position that reads it."""

    order: list[PlannedTensor]
    first_use: dict[InputShard, int]
    last_use: dict[InputShard, int]
    shard_sizes: dict[InputShard, int]

    def needed_at(self, position: int) -> list[InputShard]:
        """Return the input shards the tensor at `position` reads."""
        return sorted(self.order[position].expr.input_shards())

    def released_after(self, position: int) -> list[InputShard]:
        """Return the input shards no tensor after `position` reads."""
        return sorted(shard for shard, last in self.last_use.items() if last == position)


def shard_lifetimes(plan: Plan) -> ShardLifetimes:
    """Walk the output tensors in write order and record each input shard's first and last reader."""
    order = [tensor for shard in plan.shards for tensor in shard.tensors]
    first_use: dict[InputShard, int] = {}
    last_use: dict[InputShard, int] = {}
    for position, tensor in enumerate(order):
        for input_shard in tensor.expr.input_shards():
            first_use.setdefault(input_shard, position)
            last_use[input_shard] = position

    shard_sizes = {}
    for input_shard in first_use:
        checkpoint = plan.inputs[input_shard.model]
        shard_sizes[input_shard] = next(header.file_size for header in checkpoint.shards if header.path == input_shard.path)
    return ShardLifetimes(order, first_use, last_use, shard_sizes)


def predict_peak_disk(plan: Plan, lifetimes: ShardLifetimes, fixed_bytes: int = 0) -> int:
    """Return the maximum, over the write, of input shard bytes on disk plus output shard sizes.

    An output shard counts at its full size from the moment its writing starts,
    because the writer sizes the file up front (zero tensors stay holes).

    `fixed_bytes` counts files present the whole time, such as downloaded
    tokenizer files. Output metadata files (index, config, manifest, model card)
    are left out: they are kilobytes against shards of gigabytes.
    """
    starts: dict[int, int] = {}
    ends: dict[int, int] = {}
    for input_shard, first in lifetimes.first_use.items():
        size = lifetimes.shard_sizes[input_shard]
        starts[first] = starts.get(first, 0) + size
        ends[lifetimes.last_use[input_shard]] = ends.get(lifetimes.last_use[input_shard], 0) + size

    peak = 0
    alive = 0
    written = 0
    position = 0
    for shard in plan.shards:
        written += shard.size
        peak = max(peak, alive + written)
        for tensor in shard.tensors:
            alive += starts.get(position, 0)
            peak = max(peak, alive + written)
            alive -= ends.get(position, 0)
            position += 1
    return peak + fixed_bytes
