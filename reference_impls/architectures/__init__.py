"""Architectures that shrink the KV cache by design: tiny mixers trained from scratch, one file each.

`common.py` holds the shared contract (ArchConfig, Mixer, MixerCache, TinyLM, build); each module exports its
mixer class(es), `make(cfg) -> list[Mixer]` and the closed form of its cache bytes.
"""

from reference_impls.architectures.common import ARCHS, ArchConfig, Mixer, MixerCache, TinyLM, build

__all__ = ["ARCHS", "ArchConfig", "Mixer", "MixerCache", "TinyLM", "build"]
