"""Writing a result as JSON plus a PNG, shared by the benchmarks and the reproductions."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

__all__ = ["device_slug", "save_result"]


def device_slug(name: str) -> str:
    """The results folder of a device: its name in lower case, every run of other characters one dash
    ("AMD EPYC (2 threads)" -> "amd-epyc-2-threads")."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def save_result(result: dict, folder: str | Path, stem: str, plotter: Callable[[dict, Path], None] | None) -> Path:
    """``folder/stem.json`` always; ``folder/stem.png`` when there is a plotter and matplotlib is installed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=1))
    try:
        if plotter is not None:
            plotter(result, folder / f"{stem}.png")
    except ImportError:
        pass
    return folder
