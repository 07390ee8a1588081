"""Where the project's data lives: the repository root holds `taxonomy/` and `notebooks/`."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["project_root", "taxonomy_dir"]


def project_root() -> Path:
    """The kvatlas checkout: $KVATLAS_ROOT, else the folder above this package (editable installs)."""
    env = os.environ.get("KVATLAS_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parents[2]
    if (here / "taxonomy").is_dir():
        return here
    cwd = Path.cwd().resolve()
    for d in (cwd, *cwd.parents):
        if (d / "taxonomy" / "vocabulary.yaml").is_file():
            return d
    raise FileNotFoundError("cannot find the kvatlas taxonomy/ folder: run from a checkout or set KVATLAS_ROOT")


def taxonomy_dir() -> Path:
    return project_root() / "taxonomy"
