"""Where visiontune keeps what it can compute again (features, graphs, decoded images, shard listings)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$VISIONTUNE_CACHE``, else ``$XDG_CACHE_HOME/visiontune/features`` (``~/.cache/visiontune/features``)."""
    if os.environ.get("VISIONTUNE_CACHE"):
        return Path(os.environ["VISIONTUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "visiontune" / "features"


def cache_folder(setting: str | Path | None) -> Path | None:
    """The folder a ``--cache-dir`` setting names: unset (None) the default, "none" no cache at all."""
    if setting is None or str(setting) == "":
        return default_cache_dir()
    return None if str(setting).lower() == "none" else Path(setting)
