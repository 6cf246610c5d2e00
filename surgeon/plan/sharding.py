"""Assign planned tensors to output shards from their sizes alone, and build each header."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from surgeon.errors import PlanError
from surgeon.plan.expressions import TensorExpr

SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
SHARD_METADATA = {"format": "pt"}


def parse_size(text: str | int) -> int:
    """Parse a size such as `5GB` (decimal, as Hugging Face uses) or `500MiB` into bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if not match or (unit and unit not in SIZE_UNITS):
        raise PlanError(f"invalid size {text!r}", value=text, fix="write a number with a unit, e.g. 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * SIZE_UNITS[unit or "B"])


@dataclass
class PlannedTensor:
    """One output tensor: its final name and the expression that produces it."""

    name: str
    expr: TensorExpr

    @property
    def kind(self) -> str:
        """`copy` (input byte range), `zeros`, or `computed`."""
        if self.expr.byte_range() is not None:
            return "copy"
        if self.expr.is_zeros():
            return "zeros"
        return "computed"


@dataclass
class PlannedShard:
    """One output shard: file name, tensors in data order, and the exact header bytes."""

    file_name: str
    tensors: list[PlannedTensor]
    header: bytes

    @property
    def data_size(self) -> int:
        return sum(tensor.expr.nbytes for tensor in self.tensors)

    @property
    def size(self) -> int:
        return len(self.header) + self.data_size


def build_header(tensors: list[PlannedTensor]) -> bytes:
    """Return the 8-byte length prefix plus the JSON header, space-padded to 8-byte alignment."""
    entries: dict[str, object] = {"__metadata__": SHARD_METADATA}
    offset = 0
    for tensor in tensors:
        end = offset + tensor.expr.nbytes
        entries[tensor.name] = {"dtype": tensor.expr.dtype, "shape": list(tensor.expr.shape), "data_offsets": [offset, end]}
        offset = end
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def assign_shards(tensors: list[PlannedTensor], max_shard_size: int) -> list[PlannedShard]:
    """Fill shards in plan order; a tensor larger than the limit gets a shard of its own."""
    groups: list[list[PlannedTensor]] = [[]]
    current = 0
    for tensor in tensors:
        size = tensor.expr.nbytes
        if groups[-1] and current + size > max_shard_size:
            groups.append([])
            current = 0
        groups[-1].append(tensor)
        current += size

    count = len(groups)
    shards = []
    for number, group in enumerate(groups, start=1):
        file_name = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        shards.append(PlannedShard(file_name, group, build_header(group)))
    return shards
