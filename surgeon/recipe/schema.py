"""The recipe schema (version 1), as pydantic models.

A recipe is a YAML mapping with a `version`, optional settings that apply to
the whole output, and an ordered list of `steps`. Each step is a mapping with
a single key naming its kind (`tli`, `dus`, ...), whose value holds that
step's fields. `docs/recipes.md` documents every field.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from surgeon.dtypes import FLOAT_DTYPES, dtype_from_name


class StrictModel(BaseModel):
    """A model that rejects unknown fields, so a typo in a recipe is an error, not a no-op."""

    model_config = ConfigDict(extra="forbid")


class NoiseSpec(StrictModel):
    """Gaussian noise added to a new layer's tensors; each tensor's stream depends on `seed` and its name."""

    std: float = Field(gt=0)
    seed: int = 0
    tensors: list[str] = Field(default_factory=lambda: ["*"])


class TLIStep(StrictModel):
    """Transformer Layer Injection: a new layer after (or before) every group of `every` layers."""

    every: PositiveInt
    position: Literal["after_group", "before_group"] = "after_group"
    copy_from: Literal["previous", "next", "mean"] = "previous"
    zero: Optional[list[str]] = None
    scale: dict[str, float] = Field(default_factory=dict)
    noise: Optional[NoiseSpec] = None
    remainder: Literal["skip", "insert"] = "skip"


# Step kinds by recipe key. Each model's fields are the step's options.
STEP_MODELS: dict[str, type[StrictModel]] = {
    "tli": TLIStep,
}


class ArchitectureOverride(StrictModel):
    """Names the layer layout of a model that surgeon has no table for."""

    layer_prefix: str
    output_projections: list[str] = Field(default_factory=lambda: ["self_attn.o_proj", "mlp.down_proj"])

    @field_validator("layer_prefix")
    @classmethod
    def _has_placeholder(cls, value: str) -> str:
        if value.count("{}") != 1:
            raise ValueError("layer_prefix must contain exactly one '{}' where the layer index goes, e.g. 'model.layers.{}.'")
        return value


class Recipe(StrictModel):
    """A parsed recipe: settings for the whole output and the ordered steps."""

    version: Literal[1]
    name: Optional[str] = None
    description: Optional[str] = None
    architecture: Optional[ArchitectureOverride] = None
    dtype: Optional[str] = None
    steps: list[dict[str, Any]] = Field(min_length=1)

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        dtype = dtype_from_name(value)
        if dtype is None:
            raise ValueError(f"unknown dtype {value!r}; use one of bfloat16, float16, float32 ({', '.join(FLOAT_DTYPES)})")
        return dtype
