"""Which methods are implemented: read from the taxonomy, where each entry names its class.

No registry: an entry's `implementation` field (a dotted path such as
`reference_impls.eviction.streamingllm.StreamingLLM`) is the single place that links a method id to
its code. The CLI, the benchmark and the docs all use this mapping.
"""

from __future__ import annotations

import functools
import importlib

from reference_impls.base import KVMethod

__all__ = ["implemented_methods", "method_class", "make_method"]


@functools.lru_cache(maxsize=1)
def implemented_methods() -> dict[str, str]:
    """{taxonomy id: dotted path of its KVMethod class}, sorted by id."""
    import yaml

    from reference_impls.atlas.validate import entry_files

    out = {}
    for path in entry_files():
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        if isinstance(data, dict) and data.get("implementation"):
            out[path.stem] = data["implementation"]
    return dict(sorted(out.items()))


def method_class(method_id: str) -> type[KVMethod]:
    known = implemented_methods()
    if method_id not in known:
        raise ValueError(f"unknown method {method_id!r}; implemented methods: {', '.join(known)}")
    module, _, name = known[method_id].rpartition(".")
    return getattr(importlib.import_module(module), name)


def make_method(method_id: str, ratio: float = 1.0, tokenizer=None) -> KVMethod:
    """The method `method_id` configured for a target compression ratio (full bytes / compressed bytes),
    and for `tokenizer`'s vocabulary when given (see `KVMethod.with_tokenizer`)."""
    if not isinstance(ratio, (int, float)) or ratio < 1:
        raise ValueError(f"ratio must be >= 1 (full-cache bytes over compressed bytes), got {ratio}")
    method = method_class(method_id).from_ratio(ratio)
    return method if tokenizer is None else method.with_tokenizer(tokenizer)
