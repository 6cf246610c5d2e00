"""Recipe steps: each transforms a ModelLayout into a new one."""

from __future__ import annotations

from typing import Callable

from pydantic import BaseModel

from surgeon.plan.layout import ModelLayout
from surgeon.plan.steps.moe import apply_moe
from surgeon.plan.steps.block_expansion import apply_block_expansion
from surgeon.plan.steps.dus import apply_dus
from surgeon.plan.steps.stack import apply_stack
from surgeon.plan.steps.tli import apply_tli

StepFunction = Callable[[ModelLayout, BaseModel, int], ModelLayout]

# Step implementations by recipe key; surgeon.recipe.schema.STEP_MODELS has their options.
STEP_FUNCTIONS: dict[str, StepFunction] = {
    "tli": apply_tli,
    "moe": apply_moe,
    "dus": apply_dus,
    "stack": apply_stack,
    "block_expansion": apply_block_expansion,
}
