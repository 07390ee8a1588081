"""Evidence tables and plots for the notebooks: one function, so every method page reads its results alike.

The evidence files are written by `scripts/evidence.py` (`results/<family>/<method>.json`: config, per-(setting, target ratio) summary, one row per prompt).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

__all__ = ["show_evidence"]

_ROOT = Path(__file__).resolve().parent.parent


def _find(path: Union[str, Path]) -> Path:
    """The path as given, else relative to the repository root (notebooks may run from notebooks/ or docs/)."""
    p = Path(path)
    return p if p.exists() or p.is_absolute() else _ROOT / p


def show_evidence(path: Union[str, Path], title: str, baseline: Optional[str] = "results/eviction/full.json",
                  plot: bool = True) -> Optional[dict]:
    """Print the summary table of an evidence file and plot accuracy against the achieved ratio per setting.

    The full cache's accuracy on the same prompts (`baseline`) is drawn as a dashed line per setting.
    Returns the parsed file, or None (with the command that makes it) when it does not exist yet.
    """
    p = _find(path)
    if not p.exists():
        print(f"{path} not found: run scripts/evidence.py --methods {Path(path).stem}")
        return None
    data = json.loads(p.read_text())
    cfg = data["config"]
    print(f"{cfg['samples']} prompts of ~{cfg['tokens']} tokens per point; {cfg.get('model', '')}; {cfg.get('machine', '')}")
    print(f"{'setting':16} {'target':>6} {'achieved':>8} {'n':>3} {'accuracy':>8} {'prefill s':>9} {'decode tok/s':>12}")
    for r in data["summary"]:
        dec = r["decode_tokens_per_s"] or float("nan")
        print(f"{r['setting']:16} {r['target_ratio']:6g} {r['achieved_ratio']:8.2f} {r['n']:3d} {r['accuracy']:8.2f} "
              f"{r['prefill_s']:9.1f} {dec:12.2f}")
    full = {}
    if baseline and _find(baseline).exists():
        for r in json.loads(_find(baseline).read_text())["summary"]:
            full[r["setting"]] = r["accuracy"]
        print("full cache on the same prompts:", ", ".join(f"{s} {a:.2f}" for s, a in full.items()))
    if plot:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        for i, setting in enumerate(sorted({r["setting"] for r in data["summary"]})):
            rs = sorted((r for r in data["summary"] if r["setting"] == setting), key=lambda r: r["achieved_ratio"])
            line, = ax.plot([r["achieved_ratio"] for r in rs], [r["accuracy"] for r in rs], "o-", label=setting)
            if setting in full:
                ax.axhline(full[setting], ls="--", lw=1, color=line.get_color(), label=f"full cache, {setting}")
        ax.set_xscale("log")
        ax.set_xlabel("achieved compression ratio (measured bytes)")
        ax.set_ylabel("passkey accuracy")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(title)
        ax.legend(fontsize=8)
        plt.tight_layout()
        plt.show()
    return data


def decode_memory(model, method, prompt_tokens: int = 200, steps: int = 5, seed: int = 0):
    """Prefill a random `prompt_tokens`-token prompt into `KVCache(model, method)`, then decode `steps` tokens.

    Returns (cache, kept, held): kept[i] is the list of every layer's kept slots (B, H_kv, K) and held[i] the
    bytes the cache holds after i decoded tokens (flat for methods that evict while decoding).
    """
    import torch

    from reference_impls.integration import KVCache

    hi = min(5000, model.get_input_embeddings().num_embeddings)  # ordinary tokens, no special ids at the start
    ids = torch.randint(min(100, hi // 2), hi, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    cache = KVCache(model, method)
    held, kept = [], []
    with torch.no_grad():
        model(ids, cache=cache)
        for i in range(steps + 1):
            if i:
                model(torch.tensor([[42]]), cache=cache)
            held.append(cache.nbytes())
            kept.append([layer.store.kept_slots() for layer in cache.layers])
    return cache, kept, held
