"""Planning: recipe steps over a layer layout, compiled into every output tensor and shard."""

from surgeon.plan.compile import DEFAULT_MAX_SHARD_SIZE, DEFAULT_MODEL, Plan, compile_plan
from surgeon.plan.sharding import PlannedShard, PlannedTensor, parse_size

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "DEFAULT_MODEL", "Plan", "PlannedShard", "PlannedTensor", "compile_plan", "parse_size"]
