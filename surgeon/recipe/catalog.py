"""The recipes shipped in the repository's `recipes/` folder."""

from __future__ import annotations

from pathlib import Path

RECIPES_FOLDER = Path(__file__).resolve().parents[2] / "recipes"


def shipped_recipes() -> list[tuple[Path, str]]:
    """Return each shipped recipe with its one-line description (the `description` field)."""
    import yaml

    found = []
    for path in sorted(RECIPES_FOLDER.glob("*.y*ml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        description = data.get("description") or "(no description)"
        found.append((path, " ".join(str(description).split())))
    return found
