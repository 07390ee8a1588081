"""`kvatlas new ID --principle P`: the four files a new method needs, ready to fill in.

The entry is written with `implementation: null` and placeholders that `kvatlas validate` rejects until
they are replaced; the implementation is a stub that raises NotImplementedError, so nothing is called
done before it is (see CONTRIBUTING.md).
"""

from __future__ import annotations

import re
from pathlib import Path

from reference_impls.atlas.paths import is_packaged, project_root
from reference_impls.atlas.schema import ID_RE, VOCAB

__all__ = ["FAMILY_OF", "scaffold"]

#: the package folder that holds each principle's implementations
FAMILY_OF = {
    "baseline": "baseline", "quantization": "quantization", "token-eviction": "eviction",
    "budget-allocation": "eviction", "token-merging": "merging", "low-rank": "lowrank",
    "cross-layer-sharing": "crosslayer", "head-architecture": "heads", "prompt-compression": "prompt",
    "retrieval-offload": "retrieval", "linear-hybrid": "linear",
}

_ENTRY = """\
id: {id}
name: TODO the method's name
title: TODO the paper's exact title
authors: [TODO First Author, TODO Second Author]
year: TODO
venue: null
arxiv: "TODO"              # e.g. "2402.02750"
url: https://arxiv.org/abs/TODO
code: null
bibtex: |
  @article{{TODO,
    title   = {{TODO}},
    author  = {{TODO}},
    journal = {{arXiv preprint arXiv:TODO}},
    year    = {{TODO}}
  }}
principle: {principle}
dimensions: [TODO]          # {dimensions}
training: TODO              # {training}
phase: TODO                 # {phase}
granularity: TODO           # {granularity}
budget_policy: TODO         # {budget_policy}
query_aware: false
summary: >-
  TODO two to five sentences in your own words.
key_equation: 'TODO'
reported_results: []
builds_on: []
compared_with: []
implementation: null        # reference_impls.{family}.{module}.{cls} once its tests pass
notebook: null              # notebooks/{module}.py once it runs
"""

_IMPL = '''\
"""{cls}: TODO one-line idea.

Paper: TODO authors, "title", arXiv TODO, Eq. (TODO) / Algorithm TODO.
Official code: TODO
Deviations: TODO (or "none").
"""

from __future__ import annotations

from dataclasses import dataclass

from reference_impls.base import KVMethod, LayerStore

__all__ = ["{cls}"]


@dataclass
class {cls}(KVMethod):
    """TODO: the method's knobs as fields, validated in __post_init__."""

    name = "{id}"

    def new_layer(self, layer_idx: int, num_layers: int) -> LayerStore:
        raise NotImplementedError("{id} is a scaffold: implement it as CONTRIBUTING.md describes")
'''

_TEST = '''\
"""Tests of {cls}: equivalence to an independent reference, invariants, error paths (see CONTRIBUTING.md)."""

import pytest

from reference_impls.{family}.{module} import {cls}


@pytest.mark.skip(reason="scaffold: write the tests before linking the implementation in taxonomy/{id}.yaml")
def test_matches_reference():
    raise NotImplementedError
'''

_NOTEBOOK = '''\
# ---
# jupyter:
#   jupytext:
#     text_representation: {{extension: .py, format_name: percent}}
#   kernelspec: {{display_name: Python 3, language: python, name: python3}}
# ---

# %% [markdown]
# # {cls}
# TODO: what you will learn; the key equation; the method from `reference_impls`; a check; the paper's
# key observation in miniature on the embedded model, with a plot; what the paper reported beside ours.

# %%
from reference_impls.{family}.{module} import {cls}
'''


def _class_name(method_id: str) -> str:
    return "".join(p.capitalize() for p in re.split(r"[-_]", method_id))


def scaffold(method_id: str, principle: str) -> list[Path]:
    """Write the entry, implementation stub, test and notebook; refuse to overwrite anything."""
    if not re.match(ID_RE, method_id):
        raise ValueError(f"id {method_id!r} must be a lowercase slug (letters, digits, '-'), like 'snapkv'")
    if principle not in VOCAB["principle"]:
        raise ValueError(f"--principle {principle!r} is not allowed; allowed values: {', '.join(VOCAB['principle'])}")
    if is_packaged():
        raise ValueError("kvatlas new writes into a checkout: run it inside a clone of the kvatlas repository")
    root, family, module, cls = project_root(), FAMILY_OF[principle], method_id.replace("-", "_"), _class_name(method_id)
    fmt = {"id": method_id, "principle": principle, "family": family, "module": module, "cls": cls,
           **{k: " | ".join(VOCAB[k]) for k in ("dimensions", "training", "phase", "granularity", "budget_policy")}}
    files = {
        root / "taxonomy" / f"{method_id}.yaml": _ENTRY.format(**fmt),
        root / "reference_impls" / family / f"{module}.py": _IMPL.format(**fmt),
        root / "tests" / family / f"test_{module}.py": _TEST.format(**fmt),
        root / "notebooks" / f"{module}.py": _NOTEBOOK.format(**fmt),
    }
    existing = [str(p) for p in files if p.exists()]
    if existing:
        raise ValueError(f"refusing to overwrite {', '.join(existing)}")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        init = path.parent / "__init__.py"
        if path.parent.parent.name == "reference_impls" and not init.exists():
            init.write_text(f'"""{family}: methods whose principle is {principle}."""\n')
        path.write_text(text)
    return list(files)
