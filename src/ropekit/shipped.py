"""The LongRoPE factors ropekit ships: finding the searched factors file for a model and target length.

Below ``evaluation`` and ``search`` (both read it): ``compare`` offers the shipped factors as its longrope row,
``ropekit.search`` re-exports ``shipped_factors`` where users import it from.
"""

from __future__ import annotations

import json
from pathlib import Path

# Where ropekit keeps the factors it ships: the repository's searches/ folder, reached through the link
# ropekit/search/shipped, which installs as package data (so a wheel install finds them too).
SHIPPED_DIR = Path(__file__).resolve().parent / "search" / "shipped"


def shipped_factors(model_source: str | None, target_length: int, folder: str | Path | None = None) -> Path | None:
    """The factors file ropekit ships for ``model_source`` at ``target_length`` (``searches/*.json`` whose
    ``search.model`` names the model and whose ``max_position_embeddings`` is the target), or None.

    ``model_source``: what ``load_model`` takes ("demo" or None for the bundled SmolLM2; its GGUF path counts as
    "demo" too); others match the ``search.model`` string exactly.
    """
    root = Path(folder) if folder is not None else SHIPPED_DIR
    if not root.is_dir():
        return None
    names = {str(model_source)}
    if model_source in (None, "demo"):
        names = {"demo"}
    else:
        try:
            from ropekit.hf.load import demo_model_path

            if Path(str(model_source)).expanduser().resolve() == demo_model_path().resolve():
                names.add("demo")
        except Exception:  # noqa: BLE001 - no demo package installed: only exact names match
            pass
    for path in sorted(root.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict):
            continue
        model = (data.get("search") or {}).get("model")
        if model in names and int(data.get("max_position_embeddings") or 0) == int(target_length) \
                and "long_factor" in data and "short_factor" in data:
            return path
    return None
