"""Which methods are implemented, read from the taxonomy, and methods made from a string.

No registry: an entry's `implementation` field (a dotted path such as
`reference_impls.eviction.streamingllm.StreamingLLM`) is the single place that links a method id to its
code. The CLI, the benchmark and the docs all use this mapping.

A method string names one method or a composition of an eviction method with a quantizer, each with its
knobs (the dataclass fields):

    snapkv                                   # SnapKV, configured for the target ratio
    snapkv:window=32,kernel_size=7,pooling=max,heads=adaptive
    snapkv:ratio=2+kivi:bits=4               # Compose(SnapKV(ratio=2), KIVI(bits=4))

A target ratio configures (through `from_ratio`) only what a part's own knobs leave unset: `kivi:bits=4` is
4-bit whatever the ratio, `full` ignores it. In a composition, the parts left unset share what the fixed
parts leave of the target, equally on a log scale (`snapkv+kivi` at 8x asks ~2.8x of each; `snapkv:ratio=2+kivi`
at 8x asks 4x of KIVI).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math

from reference_impls.base import KVMethod

__all__ = ["implemented_methods", "make_method", "method_class", "parse_method"]


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


def _value(text: str):
    """A knob's value from its text: int, float, bool, None, else the string itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_method(spec: str) -> list[tuple[str, dict]]:
    """'snapkv:ratio=2,window=32+kivi:bits=4' -> [('snapkv', {'ratio': 2, 'window': 32}), ('kivi', {'bits': 4})].

    Checks ids and knob names against the implementation; errors name the allowed ones."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("a method string is required, e.g. 'snapkv' or 'snapkv:ratio=2+kivi:bits=4'")
    parts = []
    for part in spec.split("+"):
        mid, _, knobs = part.strip().partition(":")
        cls = method_class(mid.strip())
        fields = [f.name for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(cls) else []
        kw = {}
        for item in filter(None, (x.strip() for x in knobs.split(","))):
            name, eq, text = item.partition("=")
            if not eq:
                raise ValueError(f"{mid}: knob {item!r} needs a value (name=value)")
            if name.strip() not in fields:
                raise ValueError(f"{mid}: unknown knob {name.strip()!r}; knobs: {', '.join(fields) or 'none'}")
            kw[name.strip()] = _value(text)
        parts.append((mid.strip(), kw))
    if len(parts) > 2:
        raise ValueError(f"{spec!r}: a composition is one eviction method + one quantizer, got {len(parts)} parts")
    return parts


def _fixed_ratio(mid: str, knobs: dict) -> float | None:
    """The ratio a part's own knobs already fix, or None when the target ratio should configure it."""
    if not knobs:
        return None
    if "ratio" in knobs:
        return float(knobs["ratio"])
    method = method_class(mid)(**knobs)
    if hasattr(method, "nominal_ratio"):
        return method.nominal_ratio()
    return 1.0  # e.g. an absolute budget: its ratio depends on the prompt, so it takes no share of the target


def make_method(spec: str, ratio: float = 1.0) -> KVMethod:
    """The method (or composition) `spec` configured for a target compression ratio (full bytes / compressed)."""
    from reference_impls.compose import Compose

    if not isinstance(ratio, (int, float)) or ratio < 1:
        raise ValueError(f"ratio must be >= 1 (full-cache bytes over compressed bytes), got {ratio}")
    parts = parse_method(spec)
    if len(parts) == 1:
        mid, knobs = parts[0]
        return method_class(mid).from_ratio(ratio, **knobs)
    fixed = [_fixed_ratio(m, k) for m, k in parts]
    unset = sum(f is None for f in fixed)
    share = (ratio / math.prod(f for f in fixed if f is not None)) ** (1 / unset) if unset else 1.0
    made = [method_class(m).from_ratio(max(share, 1.0), **k) for m, k in parts]
    from reference_impls.quantization.store import Quantizer

    return Compose(*made[::-1]) if isinstance(made[0], Quantizer) else Compose(*made)  # either order reads well
