"""Translate a mergekit `merge_method: passthrough` config into a surgeon recipe.

The semantics follow mergekit 0.1.5 (read from its source):

- Each output slice has exactly one source, whose `layer_range: [start, end]`
  is end-exclusive. Slices are concatenated in order.
- `parameters: scale` multiplies tensors. It is a number, a `{filter, value}`
  condition, or a list of conditions where the first whose `filter` is a
  substring of the tensor's name in its source model wins. A condition without
  a filter, or with `filter: "*"`, matches everything. Settings on a source
  come before those on its slice, which come before the top-level ones, and a
  level where no condition matches falls through to the next.
- The embeddings come from the first slice's model with the first slice's
  parameters; the final norm and `lm_head` come from the last slice's model
  with the last slice's parameters.
- `dtype` is the dtype tensors are loaded, scaled and written in.
- config.json comes from `base_model`. Without one, mergekit picks one of the
  referenced models in set order, which can vary between runs; surgeon takes
  the first slice's model.

Everything else mergekit accepts (other merge methods, `models:`, `modules:`,
gradients, `out_dtype`, `tokenizer:`, `chat_template`, ...) is rejected with a
RecipeError naming it, never ignored.
"""

from __future__ import annotations

import math

from typing import Any

from pydantic import ValidationError

from surgeon.dtypes import dtype_from_name
from surgeon.errors import RecipeError
from surgeon.recipe.loader import LoadedRecipe, _format_path, _line_map, _nearest_line
from surgeon.recipe.schema import GlobalTensorsSource, LayerSlice, Recipe, TensorFilter

SUPPORTED_KEYS = ("merge_method", "slices", "dtype", "tokenizer_source", "base_model", "parameters")
SUPPORTED_SLICE_KEYS = ("sources", "parameters")
SUPPORTED_SOURCE_KEYS = ("model", "layer_range", "parameters")
SUPPORTED_PARAMETERS = ("scale",)


class _Translator:
    """Walks the mergekit config, raising RecipeErrors with the file, line and field."""

    def __init__(self, data: dict, text: str, path: str) -> None:
        self.data = data
        self.path = path
        self.lines = _line_map(text)

    def error(self, message: str, field_path: tuple, **kwargs: Any) -> RecipeError:
        return RecipeError(message, path=self.path, line=_nearest_line(self.lines, field_path), field=_format_path(field_path), **kwargs)

    def check_keys(self, mapping: Any, allowed: tuple[str, ...], field_path: tuple, what: str) -> dict:
        if not isinstance(mapping, dict):
            raise self.error(f"{what} must be a mapping", field_path, value=mapping)
        for key in mapping:
            if key not in allowed:
                raise self.error(
                    f"mergekit option {key!r} is not supported by surgeon's passthrough translation",
                    field_path + (key,),
                    value=key,
                    fix=f"remove {key!r}; supported here: {', '.join(allowed)}",
                )
        return mapping

    def model_reference(self, value: Any, field_path: tuple) -> str:
        if not isinstance(value, str) or not value:
            raise self.error("a model must be a path string", field_path, value=value, fix="write the model's folder path")
        if "+" in value:
            raise self.error(
                f"LoRA model references ({value!r}) are not supported",
                field_path,
                value=value,
                fix="merge the LoRA adapter into its model first and give that folder",
            )
        return value

    def conditions(self, setting: Any, field_path: tuple) -> list[TensorFilter]:
        """Turn one mergekit `scale` setting into surgeon filters, in match order."""
        if isinstance(setting, bool) or isinstance(setting, str):
            raise self.error(f"scale must be a number, got {setting!r}", field_path, value=setting)
        if isinstance(setting, (int, float)):
            return [TensorFilter(scale=float(setting))]
        if isinstance(setting, dict):
            setting = [setting]
        if not isinstance(setting, list) or not setting:
            raise self.error("scale must be a number, a {filter, value} mapping or a list of them", field_path, value=setting)
        if all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in setting):
            raise self.error(
                "gradients (a list of numbers interpolated over the slice's layers) are not supported",
                field_path,
                value=setting,
                fix="give one number, or one value per filter",
            )
        filters = []
        for index, item in enumerate(setting):
            item_path = field_path + (index,)
            item = self.check_keys(item, ("filter", "value"), item_path, "a scale condition")
            if "value" not in item:
                raise self.error("a scale condition needs a `value`", item_path)
            value = item["value"]
            if isinstance(value, list):
                raise self.error("gradient values are not supported", item_path + ("value",), value=value, fix="give one number")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise self.error(f"scale value must be a finite number, got {value!r}", item_path + ("value",), value=value)
            selector = item.get("filter")
            if selector is not None and not isinstance(selector, str):
                raise self.error(f"filter must be a string, got {selector!r}", item_path + ("filter",), value=selector)
            name_contains = None if selector in (None, "*") else selector
            filters.append(TensorFilter(name_contains=name_contains, scale=float(value)))
        return filters

    def parameter_filters(self, parameters: Any, field_path: tuple) -> list[TensorFilter]:
        if parameters is None:
            return []
        parameters = self.check_keys(parameters, SUPPORTED_PARAMETERS, field_path, "parameters")
        if "scale" not in parameters:
            return []
        return self.conditions(parameters["scale"], field_path + ("scale",))

    def translate(self) -> tuple[Recipe, dict]:
        data = self.check_keys(self.data, SUPPORTED_KEYS, (), "a mergekit config")
        method = data.get("merge_method")
        if method != "passthrough":
            raise self.error(
                f"merge method {method!r} is not supported; surgeon runs only layer slicing",
                ("merge_method",),
                value=method,
                choices=["passthrough"],
            )
        global_filters = self.parameter_filters(data.get("parameters"), ("parameters",))

        raw_slices = data.get("slices")
        if not isinstance(raw_slices, list) or not raw_slices:
            raise self.error("a passthrough config needs a non-empty `slices` list", ("slices",), value=raw_slices)

        models: dict[str, str] = {}
        slices: list[LayerSlice] = []
        slice_fields: list[dict[str, str]] = []
        chains: list[list[TensorFilter]] = []
        for index, raw_slice in enumerate(raw_slices):
            slice_path = ("slices", index)
            raw_slice = self.check_keys(raw_slice, SUPPORTED_SLICE_KEYS, slice_path, "a slice")
            sources = raw_slice.get("sources")
            if not isinstance(sources, list) or len(sources) != 1:
                raise self.error(
                    f"a passthrough slice takes exactly one source, got {len(sources) if isinstance(sources, list) else 'none'}",
                    slice_path + ("sources",),
                    fix="give one `sources:` entry per slice; merging several sources needs another merge method",
                )
            source_path = slice_path + ("sources", 0)
            source = self.check_keys(sources[0], SUPPORTED_SOURCE_KEYS, source_path, "a slice source")
            model = self.model_reference(source.get("model"), source_path + ("model",))
            models[model] = model
            start, end = self.layer_range(source.get("layer_range"), source_path + ("layer_range",))

            chain = (
                self.parameter_filters(source.get("parameters"), source_path + ("parameters",))
                + self.parameter_filters(raw_slice.get("parameters"), slice_path + ("parameters",))
                + global_filters
            )
            chains.append(chain)
            slices.append(LayerSlice(model=model, layers=(start, end), filters=chain))
            prefix = _format_path(source_path)
            slice_fields.append({"layers": f"{prefix}.layer_range", "model": f"{prefix}.model", "filters": f"{prefix}.parameters.scale"})

        base_model = slices[0].model
        if data.get("base_model") is not None:
            base_model = self.model_reference(data["base_model"], ("base_model",))
            models[base_model] = base_model

        tokenizer_model = None
        tokenizer_source = data.get("tokenizer_source")
        if tokenizer_source == "union":
            raise self.error(
                "tokenizer_source 'union' builds a new vocabulary, which surgeon does not do",
                ("tokenizer_source",),
                value=tokenizer_source,
                fix="use `base` or one model's path, whose tokenizer must match the embeddings' vocabulary",
            )
        if tokenizer_source == "base":
            if data.get("base_model") is None:
                raise self.error("tokenizer_source 'base' needs `base_model`", ("tokenizer_source",), value=tokenizer_source)
            tokenizer_model = base_model
        elif tokenizer_source is not None:
            tokenizer_model = self.model_reference(tokenizer_source, ("tokenizer_source",))
            models[tokenizer_model] = tokenizer_model

        dtype = None
        if data.get("dtype") is not None:
            dtype = dtype_from_name(str(data["dtype"]))
            if dtype is None:
                raise self.error(
                    f"unknown dtype {data['dtype']!r}",
                    ("dtype",),
                    value=data["dtype"],
                    choices=["bfloat16", "float16", "float32"],
                )

        try:
            recipe = Recipe(
                version=1,
                dtype=dtype,
                models=models,
                slices=slices,
                base_model=base_model,
                tokenizer_model=tokenizer_model,
                embeddings=GlobalTensorsSource(model=slices[0].model, filters=chains[0]),
                head=GlobalTensorsSource(model=slices[-1].model, filters=chains[-1]),
            )
        except ValidationError as error:
            raise RecipeError(f"the translated recipe is invalid: {error}", path=self.path, fix="check the mergekit config") from None
        return recipe, {"slice_fields": slice_fields}

    def layer_range(self, value: Any, field_path: tuple) -> tuple[int, int]:
        valid = (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(item, int) and not isinstance(item, bool) for item in value)
        )
        if not valid:
            raise self.error("layer_range must be [start, end] with two integers", field_path, value=value)
        start, end = value
        if start < 0 or end <= start:
            raise self.error(
                f"layer_range [{start}, {end}] is empty or negative; the end is exclusive, so [start, end] takes end - start layers",
                field_path,
                value=value,
                fix="give 0 <= start < end",
            )
        return start, end


def translate_mergekit(data: dict, text: str, path: str) -> LoadedRecipe:
    """Return the surgeon recipe that writes the tensors mergekit's passthrough method writes for `data`."""
    recipe, extras = _Translator(data, text, path).translate()
    return LoadedRecipe(recipe=recipe, steps=[], text=text, path=path, source_format="mergekit", extras=extras)


__all__ = ["translate_mergekit"]
