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

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Return the rows rounded to this dtype, so an expression built on top computes on the stored values."""
        values = self.source.read_rows(start, stop)
        return decode(encode(values, self.dtype), self.dtype, values.size)

    def describe(self) -> str:
        return f"{self.source.describe()} as {self.dtype}"


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
    return Converted(source, dtype)


def derive_seed(seed: int, name: str) -> int:
    """Return a per-tensor 64-bit seed from a recipe seed and the output tensor name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")
