"""The recipe schema (version 1), as pydantic models.

A recipe is a YAML mapping with a `version`, optional settings that apply to
the whole output, and an ordered list of `steps`. Each step is a mapping with
a single key naming its kind (`tli`, `dus`, ...), whose value contains that
step's fields. `docs/recipes.md` documents every field.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from surgeon.dtypes import FLOAT_DTYPES, dtype_from_name


class StrictModel(BaseModel):
    """A model that rejects unknown fields, NaN and infinity, and booleans given for numbers.

    YAML reads `yes` and `true` as booleans, which pydantic would otherwise accept as 1.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_booleans_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in data.items():
                field_info = cls.model_fields.get(name)
                if isinstance(value, bool) and field_info is not None and field_info.annotation in (int, float):
                    raise ValueError(f"{name} must be a number, not the boolean {str(value).lower()}")
        return data


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


class RouterInit(StrictModel):
    """Router (gate) initialisation for the `moe` step; each router matrix has shape (experts, hidden_size)."""

    init: Literal["zeros", "random", "hidden"] = "zeros"
    std: Optional[float] = Field(default=None, gt=0)
    seed: int = 0
    # For `hidden`: one list of prompts per expert, in expert order.
    prompts: Optional[list[list[str]]] = None
    # For `hidden`: tokenizer folder. By default, the folder of the checkpoint that contains the embeddings.
    tokenizer: Optional[str] = None

    @model_validator(mode="after")
    def _options_match_init(self) -> "RouterInit":
        if self.init == "random" and self.std is None:
            raise ValueError("router init 'random' needs `std`, the standard deviation of the normal distribution, e.g. std: 0.02")
        if self.init != "random" and self.std is not None:
            raise ValueError(f"`std` applies only to router init 'random', not {self.init!r}; remove it")
        if self.init == "hidden" and not self.prompts:
            raise ValueError("router init 'hidden' needs `prompts`: one list of prompts per expert")
        if self.init != "hidden" and (self.prompts is not None or self.tokenizer is not None):
            raise ValueError(f"`prompts` and `tokenizer` apply only to router init 'hidden', not {self.init!r}; remove them")
        if self.prompts is not None and any(not expert_prompts for expert_prompts in self.prompts):
            raise ValueError("every expert needs at least one prompt in `prompts`")
        return self


class ExpertNoise(StrictModel):
    """Gaussian noise added to every expert's projections, so identical experts differ."""

    std: float = Field(gt=0)
    seed: int = 0
    projections: list[Literal["gate", "up", "down"]] = Field(default_factory=lambda: ["gate", "up", "down"], min_length=1)


class DropUpcycling(StrictModel):
    """Re-draw a fraction of each expert's intermediate units from the dense weights' statistics."""

    ratio: float = Field(gt=0, le=1)
    seed: int = 0


class MoEStep(StrictModel):
    """Sparse upcycling: each dense MLP becomes `experts` copies behind a router."""

    experts: int = Field(ge=2)
    experts_per_token: PositiveInt
    # Output layer indices that become sparse; None means every layer.
    layers: Optional[list[NonNegativeInt]] = Field(default=None, min_length=1)
    router: RouterInit = Field(default_factory=RouterInit)
    layout: Literal["per_expert", "fused"] = "per_expert"
    # Split each copy's intermediate dimension into this many fine-grained experts.
    granularity: PositiveInt = 1
    noise: Optional[ExpertNoise] = None
    drop_upcycling: Optional[DropUpcycling] = None

    @model_validator(mode="after")
    def _consistent_counts(self) -> "MoEStep":
        total = self.experts * self.granularity
        if self.experts_per_token > total:
            raise ValueError(f"experts_per_token ({self.experts_per_token}) exceeds the number of experts ({total} = experts x granularity)")
        if self.router.prompts is not None and len(self.router.prompts) != self.experts:
            raise ValueError(f"router.prompts has {len(self.router.prompts)} lists for {self.experts} experts; give one list per expert")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers lists an index twice: {self.layers}")
        return self

class DUSStep(StrictModel):
    """Depth Up-Scaling (SOLAR): layers [0, n - overlap) followed by layers [overlap, n)."""

    overlap: PositiveInt


class StackStep(StrictModel):
    """G_stack: the whole layer stack repeated `times` times."""

    # The bound keeps a typo from planning millions of layers; 64 copies of a 405B stack is already far past any use.
    times: int = Field(ge=2, le=64)


class BlockExpansionStep(StrictModel):
    """LLaMA Pro block expansion: `blocks` new identity layers spread evenly over a span of layers.

    `span` gives the start and end of the span as fractions of the layer count
    (Llama SLayer expands only the shallow half, `[0.0, 0.5]`).
    """

    blocks: PositiveInt
    span: tuple[float, float] = (0.0, 1.0)
    copy_from: Literal["previous", "mean"] = "previous"
    zero: Optional[list[str]] = None

    @field_validator("span")
    @classmethod
    def _ordered_fractions(cls, value: tuple[float, float]) -> tuple[float, float]:
        start, end = value
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"span must be [start, end] with 0 <= start < end <= 1, got {list(value)}")
        return value


# Step kinds by recipe key. Each model's fields are the step's options.
STEP_MODELS: dict[str, type[StrictModel]] = {
    "tli": TLIStep,
    "moe": MoEStep,
    "dus": DUSStep,
    "stack": StackStep,
    "block_expansion": BlockExpansionStep,
}


class TensorFilter(StrictModel):
    """A scale for the tensors a pattern selects; in a list of filters the first match decides.

    `tensors` is a glob over the name suffix inside a layer (`self_attn.o_proj`)
    or over the full name of a tensor outside the layers. `name_contains` is a
    substring of the tensor's full name in its source model, which is how
    mergekit's `filter` matches. A filter with neither selects every tensor.
    """

    tensors: Optional[str] = None
    name_contains: Optional[str] = None
    scale: float

    @model_validator(mode="after")
    def _one_selector(self) -> "TensorFilter":
        if self.tensors is not None and self.name_contains is not None:
            raise ValueError("give either `tensors` or `name_contains`, not both")
        return self


class LayerSlice(StrictModel):
    """Layers [start, end) of one source model, end exclusive, with optional scale filters."""

    model: str
    layers: tuple[int, int]
    filters: list[TensorFilter] = Field(default_factory=list)

    @field_validator("layers")
    @classmethod
    def _non_empty_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end <= start:
            raise ValueError(f"layers must be [start, end] with 0 <= start < end (end exclusive), got {list(value)}")
        return value


class GlobalTensorsSource(StrictModel):
    """The model that supplies tensors outside the decoder layers, with optional scale filters."""

    model: str
    filters: list[TensorFilter] = Field(default_factory=list)


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
    # Source models by key: a folder path (relative paths resolve against the recipe's folder first).
    models: dict[str, str] = Field(default_factory=dict)
    slices: Optional[list[LayerSlice]] = Field(default=None, min_length=1)
    # Config, tokenizer and other non-weight files come from `base_model`; default: the first slice's model.
    base_model: Optional[str] = None
    tokenizer_model: Optional[str] = None
    embeddings: Optional[GlobalTensorsSource] = None
    head: Optional[GlobalTensorsSource] = None
    steps: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _has_work(self) -> "Recipe":
        if not self.steps and not self.slices:
            raise ValueError("a recipe needs `steps`, `slices` or both")
        return self

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        dtype = dtype_from_name(value)
        if dtype is None:
            raise ValueError(f"unknown dtype {value!r}; use one of bfloat16, float16, float32 ({', '.join(FLOAT_DTYPES)})")
        return dtype
