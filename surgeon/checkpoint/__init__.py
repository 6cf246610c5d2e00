"""Reading input checkpoints: safetensors headers, the shard index and config.json."""

from surgeon.checkpoint.header import ShardHeader, TensorInfo, read_header
from surgeon.checkpoint.reader import Checkpoint, open_checkpoint

__all__ = ["Checkpoint", "ShardHeader", "TensorInfo", "open_checkpoint", "read_header"]
