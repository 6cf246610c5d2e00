"""The safetensors dtype table, and conversion between bytes and float arrays.

numpy has no bfloat16, so bf16 data is carried as uint16 bit patterns and
widened to float32 by a 16-bit shift; narrowing rounds to nearest even.
"""

from __future__ import annotations

import numpy as np

from surgeon.errors import PlanError

# Element size in bytes of every dtype the safetensors format defines.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "F4": 1,
    "F6_E2M3": 1,
    "F6_E3M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

# Dtypes surgeon can compute on (scale, mean, noise, conversion).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

# Recipe spellings of dtypes, as torch and mergekit write them.
DTYPE_ALIASES: dict[str, str] = {
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
    "float64": "F64",
    "fp64": "F64",
}

_NUMPY_STORAGE = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": np.uint16}


def dtype_from_name(name: str) -> str | None:
    """Return the safetensors dtype for a recipe spelling such as `bfloat16`, or None."""
    if name in FLOAT_DTYPES:
        return name
    return DTYPE_ALIASES.get(name.lower())


def compute_dtype(dtype: str) -> type:
    """Return the numpy float type used to compute on tensors stored as `dtype`."""
    return np.float64 if dtype == "F64" else np.float32


def decode(data: bytes | memoryview, dtype: str, count: int) -> np.ndarray:
    """Decode `count` little-endian elements of a float dtype into a compute array."""
    if dtype not in _NUMPY_STORAGE:
        raise PlanError(
            f"cannot compute on dtype {dtype}",
            value=dtype,
            fix="only F16, BF16, F32 and F64 tensors can be scaled, averaged, perturbed or converted",
        )
    raw = np.frombuffer(data, dtype=np.dtype(_NUMPY_STORAGE[dtype]).newbyteorder("<"), count=count)
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(compute_dtype(dtype), copy=False)


def encode(values: np.ndarray, dtype: str) -> bytes:
    """Encode a float array as little-endian bytes of `dtype` (bf16 rounds to nearest even)."""
    if dtype == "BF16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        nan = np.isnan(values)
        rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
        narrowed = ((bits + rounding) >> 16).astype(np.uint16)
        narrowed[nan] = 0x7FC0
        return narrowed.astype("<u2").tobytes()
    if dtype not in _NUMPY_STORAGE:
        raise PlanError(f"cannot write computed values as dtype {dtype}", value=dtype, fix="use F16, BF16, F32 or F64")
    return np.ascontiguousarray(values, dtype=np.dtype(_NUMPY_STORAGE[dtype]).newbyteorder("<")).tobytes()
