"""Tensor expressions: how each output tensor is made from input tensors.

A plan step never touches tensor data; it builds expressions. The writer then
turns each expression into the cheapest operation: a byte-range copy when the
expression is an unchanged input tensor (or a row range of one), zeros when it
is all zeros, and chunked numpy computation otherwise. Computation runs over
blocks of leading-dimension rows, so memory stays bounded whatever the tensor
size.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from surgeon.checkpoint import Checkpoint, TensorInfo
from surgeon.dtypes import DTYPE_SIZES, compute_dtype, decode, encode
from surgeon.errors import PlanError


@dataclass(frozen=True)
class ByteRange:
    """An exact byte range of an input shard that forms an output tensor's data."""

    checkpoint: Checkpoint
    info: TensorInfo
    start: int
    length: int


class InputShard(NamedTuple):
    """One input shard file, keyed by the recipe's model key and the shard's path."""

    model: str
    path: Path


class TensorExpr(ABC):
    """An output tensor's recipe: dtype, shape and how to produce its rows."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]

    @property
    def rows(self) -> int:
        """Length of the leading dimension (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_elements(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    def byte_range(self) -> ByteRange | None:
        """Return the input bytes that equal this tensor's data, or None if it must be computed."""
        return None

    def is_zeros(self) -> bool:
        return False

    def parts(self) -> list["TensorExpr"] | None:
        """Return tensors whose data, written one after another, is this tensor's data, or None if it is one piece."""
        return None

    def input_shards(self) -> frozenset[InputShard]:
        """Return every input shard this tensor reads, so streamed inputs know when a shard is needed."""
        raise PlanError(
            f"{type(self).__name__} does not list the input shards it reads",
            fix="implement input_shards() for this expression, or run without --stream-input",
        )

    @abstractmethod
    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Return rows [start, stop) as a flat array in the compute dtype."""

    @abstractmethod
    def describe(self) -> str:
        """Return a one-line account of where the values come from, for manifests and plans."""


class InputTensor(TensorExpr):
    """An input tensor, unchanged."""

    def __init__(self, checkpoint: Checkpoint, model: str, info: TensorInfo) -> None:
        self.checkpoint = checkpoint
        self.model = model
        self.info = info
        self.dtype = info.dtype
        self.shape = info.shape

    def byte_range(self) -> ByteRange:
        return ByteRange(self.checkpoint, self.info, 0, self.info.nbytes)

    def input_shards(self) -> frozenset[InputShard]:
        return frozenset({InputShard(self.model, self.info.shard)})

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        row_bytes = self.row_elements * DTYPE_SIZES[self.dtype]
        data = self.checkpoint.read(self.info, start * row_bytes, (stop - start) * row_bytes)
        return decode(data, self.dtype, (stop - start) * self.row_elements)

    def describe(self) -> str:
        return f"{self.model}:{self.info.name}"


class RowSlice(TensorExpr):
    """Rows [start, stop) of the leading dimension of another tensor."""

    def __init__(self, source: TensorExpr, start: int, stop: int) -> None:
        if not 0 <= start < stop <= source.rows or not source.shape:
            raise PlanError(f"row slice [{start}, {stop}) is outside {source.describe()} with shape {source.shape}")
        self.source = source
        self.start = start
        self.stop = stop
        self.dtype = source.dtype
        self.shape = (stop - start, *source.shape[1:])

    def byte_range(self) -> ByteRange | None:
        inner = self.source.byte_range()
        if inner is None:
            return None
        row_bytes = self.row_elements * DTYPE_SIZES[self.dtype]
        return ByteRange(inner.checkpoint, inner.info, inner.start + self.start * row_bytes, self.nbytes)

    def is_zeros(self) -> bool:
        return self.source.is_zeros()

    def input_shards(self) -> frozenset[InputShard]:
        return self.source.input_shards()

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return self.source.read_rows(self.start + start, self.start + stop)

    def describe(self) -> str:
        return f"rows[{self.start}:{self.stop}] of {self.source.describe()}"


class Zeros(TensorExpr):
    """A tensor of zeros; the writer emits it without building an array."""

    def __init__(self, dtype: str, shape: tuple[int, ...]) -> None:
        self.dtype = dtype
        self.shape = tuple(shape)

    def is_zeros(self) -> bool:
        return True

    def input_shards(self) -> frozenset[InputShard]:
        return frozenset()

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return np.zeros((stop - start) * self.row_elements, dtype=compute_dtype(self.dtype))

    def describe(self) -> str:
        return "zeros"


class Scaled(TensorExpr):
    """Another tensor multiplied by a constant."""

    def __init__(self, source: TensorExpr, factor: float) -> None:
        self.source = source
        self.factor = factor
        self.dtype = source.dtype
        self.shape = source.shape

    def input_shards(self) -> frozenset[InputShard]:
        return self.source.input_shards()

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return self.source.read_rows(start, stop) * self.factor

    def describe(self) -> str:
        return f"{self.factor:g} * {self.source.describe()}"


class Mean(TensorExpr):
    """The elementwise mean of tensors of one dtype and shape."""

    def __init__(self, sources: list[TensorExpr]) -> None:
        first = sources[0]
        for other in sources[1:]:
            if other.shape != first.shape or other.dtype != first.dtype:
                raise PlanError(
                    f"cannot average {first.describe()} ({first.dtype} {first.shape}) "
                    f"with {other.describe()} ({other.dtype} {other.shape})"
                )
        self.sources = sources
        self.dtype = first.dtype
        self.shape = first.shape

    def input_shards(self) -> frozenset[InputShard]:
        return frozenset().union(*(source.input_shards() for source in self.sources))

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        total = self.sources[0].read_rows(start, stop).copy()
        for source in self.sources[1:]:
            total += source.read_rows(start, stop)
        return total / len(self.sources)

    def describe(self) -> str:
        return "mean(" + ", ".join(source.describe() for source in self.sources) + ")"


class WithNoise(TensorExpr):
    """Another tensor plus Gaussian noise that depends only on the seed and row index.

    Each row draws from its own Philox stream, so the values do not depend on
    how the writer splits the tensor into chunks.
    """

    def __init__(self, source: TensorExpr, std: float, seed: int) -> None:
        self.source = source
        self.std = std
        self.seed = seed
        self.dtype = source.dtype
        self.shape = source.shape

    def input_shards(self) -> frozenset[InputShard]:
        return self.source.input_shards()

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        values = self.source.read_rows(start, stop).copy()
        width = self.row_elements
        for row in range(start, stop):
            generator = np.random.Generator(np.random.Philox(key=self.seed, counter=row))
            offset = (row - start) * width
            values[offset : offset + width] += generator.standard_normal(width, dtype=np.float64).astype(values.dtype) * self.std
        return values

    def describe(self) -> str:
        return f"{self.source.describe()} + noise(std={self.std:g}, seed={self.seed})"


class Converted(TensorExpr):
    """Another tensor written in a different float dtype."""

    def __init__(self, source: TensorExpr, dtype: str) -> None:
        self.source = source
        self.dtype = dtype
        self.shape = source.shape

    def is_zeros(self) -> bool:
        return self.source.is_zeros()

    def input_shards(self) -> frozenset[InputShard]:
        return self.source.input_shards()

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Return the rows rounded to this dtype, so an expression built on top computes on the stored values."""
        values = self.source.read_rows(start, stop)
        return decode(encode(values, self.dtype), self.dtype, values.size)

    def describe(self) -> str:
        return f"{self.source.describe()} as {self.dtype}"


class ColumnSlice(TensorExpr):
    """Columns [start, stop) of a 2-D tensor, always computed because the columns are not contiguous bytes."""

    def __init__(self, source: TensorExpr, start: int, stop: int) -> None:
        if len(source.shape) != 2 or not 0 <= start < stop <= source.shape[1]:
            raise PlanError(f"column slice [{start}, {stop}) is outside {source.describe()} with shape {source.shape}")
        self.source = source
        self.start = start
        self.stop = stop
        self.dtype = source.dtype
        self.shape = (source.shape[0], stop - start)

    def is_zeros(self) -> bool:
        return self.source.is_zeros()

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        rows = self.source.read_rows(start, stop).reshape(stop - start, self.source.shape[1])
        return np.ascontiguousarray(rows[:, self.start : self.stop]).reshape(-1)

    def describe(self) -> str:
        return f"columns[{self.start}:{self.stop}] of {self.source.describe()}"

    def input_shards(self) -> frozenset[InputShard]:
        return self.source.input_shards()


class Concatenated(TensorExpr):
    """Tensors of one dtype laid end to end in memory and viewed with a new shape.

    Stacking experts on a new leading dimension, or concatenating gate and up
    rows, is this: the writer writes each part in turn, so parts that are
    unchanged input tensors stay kernel byte copies.
    """

    def __init__(self, sources: list[TensorExpr], shape: tuple[int, ...]) -> None:
        dtypes = {source.dtype for source in sources}
        if len(dtypes) != 1:
            raise PlanError(f"cannot concatenate tensors of different dtypes {sorted(dtypes)}: " + ", ".join(s.describe() for s in sources))
        total = sum(source.numel for source in sources)
        if total != math.prod(shape):
            raise PlanError(f"cannot view {total} concatenated elements as shape {tuple(shape)}")
        self.sources = list(sources)
        self.dtype = dtypes.pop()
        self.shape = tuple(shape)

    def parts(self) -> list[TensorExpr]:
        return self.sources

    def is_zeros(self) -> bool:
        return all(source.is_zeros() for source in self.sources)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        first, last = start * self.row_elements, stop * self.row_elements
        pieces = []
        offset = 0
        for source in self.sources:
            begin, end = max(first, offset), min(last, offset + source.numel)
            if begin < end:
                width = source.row_elements
                row_start, row_stop = (begin - offset) // width, -(-(end - offset) // width)
                rows = source.read_rows(row_start, row_stop)
                skip = begin - offset - row_start * width
                pieces.append(rows[skip : skip + end - begin])
            offset += source.numel
        return np.concatenate(pieces)

    def describe(self) -> str:
        return f"concat{list(self.shape)}(" + ", ".join(source.describe() for source in self.sources) + ")"

    def input_shards(self) -> frozenset[InputShard]:
        return frozenset().union(*(source.input_shards() for source in self.sources))


class PartialReinit(TensorExpr):
    """A 2-D tensor with some rows or columns re-drawn from N(mean, std) of the whole source tensor.

    This is Drop-Upcycling's re-initialisation. The mean and standard deviation
    are computed on first use in one chunked pass over the source. Each row
    draws from its own Philox stream, so values do not depend on chunking.
    """

    STATISTICS_CHUNK_ROWS = 256

    def __init__(self, source: TensorExpr, axis: int, indices: np.ndarray, seed: int) -> None:
        if len(source.shape) != 2 or axis not in (0, 1):
            raise PlanError(f"partial re-initialisation needs a 2-D tensor and axis 0 or 1, got {source.describe()} {source.shape}")
        self.source = source
        self.axis = axis
        self.indices = np.sort(np.asarray(indices, dtype=np.int64))
        self.seed = seed
        self.dtype = source.dtype
        self.shape = source.shape
        self._statistics: tuple[float, float] | None = None

    def statistics(self) -> tuple[float, float]:
        """Return the source's mean and standard deviation, in float64."""
        if self._statistics is None:
            total = total_squares = 0.0
            for start in range(0, self.source.rows, self.STATISTICS_CHUNK_ROWS):
                values = self.source.read_rows(start, min(start + self.STATISTICS_CHUNK_ROWS, self.source.rows)).astype(np.float64)
                total += float(values.sum())
                total_squares += float(np.square(values).sum())
            mean = total / self.source.numel
            self._statistics = (mean, math.sqrt(max(total_squares / self.source.numel - mean * mean, 0.0)))
        return self._statistics

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        mean, std = self.statistics()
        width = self.shape[1]
        values = self.source.read_rows(start, stop).reshape(stop - start, width).copy()
        if self.axis == 0:
            selected = self.indices[(self.indices >= start) & (self.indices < stop)]
            targets = [(row, slice(None)) for row in selected]
            draw = width
        else:
            targets = [(row, self.indices) for row in range(start, stop)]
            draw = len(self.indices)
        for row, columns in targets:
            generator = np.random.Generator(np.random.Philox(key=self.seed, counter=int(row)))
            values[row - start, columns] = mean + std * generator.standard_normal(draw, dtype=np.float64)
        return values.reshape(-1)

    def describe(self) -> str:
        kind = "rows" if self.axis == 0 else "columns"
        return f"{self.source.describe()} with {len(self.indices)} {kind} re-drawn from its N(mean, std) (seed={self.seed})"

    def input_shards(self) -> frozenset[InputShard]:
        return self.source.input_shards()


class Precomputed(TensorExpr):
    """A small tensor whose values surgeon computed while planning (such as a router from hidden states)."""

    def __init__(self, values: np.ndarray, dtype: str, origin: str) -> None:
        self.values = np.ascontiguousarray(values, dtype=np.float64)
        self.dtype = dtype
        self.shape = tuple(self.values.shape)
        self.origin = origin

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return self.values[start:stop].reshape(-1)

    def describe(self) -> str:
        digest = hashlib.sha256(self.values.tobytes()).hexdigest()[:16]
        return f"{self.origin} (sha256 {digest})"

    def input_shards(self) -> frozenset[InputShard]:
        return frozenset()


def scaled(source: TensorExpr, factor: float) -> TensorExpr:
    """Return `source * factor`, simplified to zeros or the source itself where possible."""
    if factor == 0:
        return Zeros(source.dtype, source.shape)
    if factor == 1:
        return source
    return Scaled(source, factor)


def converted(source: TensorExpr, dtype: str) -> TensorExpr:
    """Return `source` in `dtype`; unchanged (and so still a byte copy) when it already is."""
    if source.dtype == dtype:
        return source
    if source.is_zeros():
        return Zeros(dtype, source.shape)
    parts = source.parts()
    if parts is not None:
        return Concatenated([converted(part, dtype) for part in parts], source.shape)
    return Converted(source, dtype)


def derive_seed(seed: int, name: str) -> int:
    """Return a per-tensor 64-bit seed from a recipe seed and the output tensor name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")
