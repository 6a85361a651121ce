"""Argument types for the command-line tools' ``--out``: a path that cannot be written is refused when the
arguments are read (one line, exit status 2), not after a run whose results it would then lose."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def out_folder(value: str) -> str:
    """A folder that exists or can be made: its nearest existing ancestor is a writable folder."""
    _writable_ancestor(Path(value), value)
    return value


def out_file(value: str) -> str:
    """A file that can be written: not a folder, and its folder exists or can be made."""
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder, not a file")
    _writable_ancestor(path.parent, value)
    return value


def _writable_ancestor(path: Path, value: str) -> None:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{value}: {probe} is not writable")
