"""Recipe steps: each transforms a ModelLayout into a new one."""

from __future__ import annotations

from typing import Callable

from pydantic import BaseModel

from surgeon.plan.layout import ModelLayout
from surgeon.plan.steps.moe import apply_moe
from surgeon.plan.steps.tli import apply_tli

StepFunction = Callable[[ModelLayout, BaseModel, int], ModelLayout]

# Step implementations by recipe key; surgeon.recipe.schema.STEP_MODELS has their options.
STEP_FUNCTIONS: dict[str, StepFunction] = {
    "tli": apply_tli,
    "moe": apply_moe,
}
