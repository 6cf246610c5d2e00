"""The recipes shipped with surgeon, found by file name or by name alone (`tli_k4`)."""

from __future__ import annotations

import sys
from pathlib import Path

# The repository's recipes/ folder, and where a wheel installs it (see pyproject's data-files).
RECIPE_FOLDERS = (
    Path(__file__).resolve().parents[2] / "recipes",
    Path(sys.prefix) / "share" / "surgeon" / "recipes",
)


def shipped_recipe_paths() -> list[Path]:
    """Return every shipped recipe file, the first folder that has a name winning."""
    found: dict[str, Path] = {}
    for folder in RECIPE_FOLDERS:
        for path in sorted(folder.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return [found[name] for name in sorted(found)]


def find_shipped_recipe(name: str) -> Path | None:
    """Return the shipped recipe called `name` (with or without `.yaml`), or None."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    for path in shipped_recipe_paths():
        if path.stem == stem:
            return path
    return None


def shipped_recipes() -> list[tuple[Path, str]]:
    """Return each shipped recipe with its one-line description (the `description` field)."""
    import yaml

    found = []
    for path in shipped_recipe_paths():
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        description = data.get("description") or "(no description)"
        found.append((path, " ".join(str(description).split())))
    return found
