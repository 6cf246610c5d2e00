"""The model card (README.md) written into every output folder."""

from __future__ import annotations

import yaml

from surgeon.plan import Plan


def render_model_card(plan: Plan, base_model_ids: list[str] | None = None) -> str:
    """Return README.md text: Hub metadata front matter, the recipe and the layer map."""
    # The Hub lists models tagged `merge` under merges; mergekit's own cards add `mergekit` as well.
    tags = ["surgeon", "merge"] + (["mergekit"] if plan.recipe.source_format == "mergekit" else [])
    metadata: dict = {"library_name": "transformers", "tags": tags + sorted({kind for kind, _ in plan.recipe.steps})}
    if base_model_ids:
        metadata["base_model"] = base_model_ids if len(base_model_ids) > 1 else base_model_ids[0]
        # The Hub accepts adapter, merge, quantized or finetune here; layers copied
        # and combined without training are a merge, as in mergekit passthrough cards.
        metadata["base_model_relation"] = "merge"
    front_matter = yaml.safe_dump(metadata, sort_keys=False).strip()

    new_layers = [entry["index"] for entry in plan.layer_map() if entry["new"]]
    lines = [
        "---",
        front_matter,
        "---",
        "",
        "# " + " ".join(plan.recipe.name.split()),
        "",
        f"This model was made with surgeon from {', '.join(base_model_ids or sorted(plan.inputs))} "
        f"by the recipe below. It has {len(plan.layout.layers)} decoder layers "
        f"({len(new_layers)} new) and {plan.parameter_count():,} parameters.",
        "",
        "## Recipe",
        "",
        "```yaml",
        plan.recipe.text.rstrip(),
        "```",
        "",
        "## Layer map",
        "",
        "| output layer | source model | source layer | new | initialisation |",
        "| --- | --- | --- | --- | --- |",
    ]
    for entry in plan.layer_map():
        lines.append(
            f"| {entry['index']} | {entry['source_model']} | {entry['source_layer']} | {'yes' if entry['new'] else ''} | {entry['init']} |"
        )
    return "\n".join(lines) + "\n"
