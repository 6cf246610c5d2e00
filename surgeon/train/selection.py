"""Parameter selection for `--train`: which parameters train and which stay frozen.

Separate from the loop because it works on the unwrapped model and needs only the checkpoint's surgeon.json.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from surgeon.errors import TrainingError
from surgeon.train.checkpoints import MANIFEST_NAME


def read_new_layer_indices(checkpoint: Path) -> list[int]:
    """Return the decoder layer indices that the checkpoint's `surgeon.json` marks as new (injected)."""
    manifest_path = checkpoint / MANIFEST_NAME
    if not manifest_path.is_file():
        raise TrainingError(
            "--train new needs surgeon.json, which marks the injected layers, but it is missing",
            path=manifest_path,
            fix="train a folder written by surgeon, or select parameters with --train all or --train 'PATTERN'",
        )

    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise TrainingError(f"invalid JSON: {error.msg}", path=manifest_path, line=error.lineno) from error

    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(layers, list):
        raise TrainingError("surgeon.json has no 'layers' list", path=manifest_path, field="layers")

    indices = []
    for position, layer in enumerate(layers):
        if not isinstance(layer, dict) or not isinstance(layer.get("index"), int):
            raise TrainingError("each layer needs an integer 'index'", path=manifest_path, field=f"layers[{position}]", value=layer)
        if layer.get("new") is True:
            indices.append(layer["index"])

    if not indices:
        raise TrainingError(
            "surgeon.json marks no layer as new, so --train new would train nothing",
            path=manifest_path,
            fix="use --train all or --train 'PATTERN'",
        )
    return sorted(indices)


def _selector_matcher(selector: str, checkpoint: Path) -> Any:
    """Return a predicate on parameter names for one `--train` value."""
    if selector == "all":
        return lambda name: True

    if selector == "new":
        prefixes = tuple(f"model.layers.{index}." for index in read_new_layer_indices(checkpoint))
        return lambda name: name.startswith(prefixes)

    if selector.startswith("re:"):
        try:
            pattern = re.compile(selector[3:])
        except re.error as error:
            raise TrainingError(f"invalid regular expression: {error}", field="train", value=selector) from error
        return lambda name: pattern.search(name) is not None

    return lambda name: fnmatch.fnmatchcase(name, selector)


def select_trainable_parameters(model: torch.nn.Module, selectors: Sequence[str], checkpoint: Path) -> list[str]:
    """Set `requires_grad` to train the union of `selectors` and freeze the rest; return the trainable names.

    A selector is `all`, `new` (layers marked new in surgeon.json), `re:REGEX`
    (searched in the name) or an fnmatch glob matched against the whole name.
    Tied weights are one parameter under several names: it trains when any of
    its names matches, and is counted and returned once.
    """
    all_names = list(model.named_parameters(remove_duplicate=False))
    selected_ids: set[int] = set()
    for selector in selectors:
        matches = _selector_matcher(selector, checkpoint)
        matched = [parameter for name, parameter in all_names if matches(name)]
        if not matched:
            examples = ", ".join(name for name, _ in all_names[:3])
            raise TrainingError(
                "the selector matches no parameter",
                field="train",
                value=selector,
                fix=f"parameter names look like {examples}; use a glob such as 'model.layers.4.*' or 're:REGEX'",
            )
        selected_ids.update(id(parameter) for parameter in matched)

    for _, parameter in all_names:
        parameter.requires_grad_(id(parameter) in selected_ids)

    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]
