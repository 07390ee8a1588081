"""Where the project's data lives: a checkout's root holds `taxonomy/` and `notebooks/`; a wheel carries a copy.

The order: $KVATLAS_ROOT; the checkout this package sits in (editable installs); a checkout containing the
working folder; the taxonomy the wheel carries (`reference_impls/atlas/data/taxonomy/`, copied there by
setup.py when the wheel is built: an installed kvatlas lists, cites and exports the atlas it was built with).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["project_root", "taxonomy_dir", "PACKAGED_ROOT", "is_packaged"]

PACKAGED_ROOT = Path(__file__).resolve().parent / "data"  # holds taxonomy/ in an installed wheel only


def project_root() -> Path:
    """The kvatlas checkout ($KVATLAS_ROOT, this package's, the working folder's), else the wheel's data."""
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
    if (PACKAGED_ROOT / "taxonomy" / "vocabulary.yaml").is_file():
        return PACKAGED_ROOT
    raise FileNotFoundError("cannot find the kvatlas taxonomy/ folder: run from a checkout or set KVATLAS_ROOT")


def taxonomy_dir() -> Path:
    return project_root() / "taxonomy"


def is_packaged() -> bool:
    """True when the atlas in use is the wheel's read-only copy (no notebooks, nowhere to scaffold)."""
    return project_root() == PACKAGED_ROOT
