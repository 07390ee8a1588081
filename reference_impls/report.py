"""Evidence tables and plots for the notebooks: one function, so every method page reads its results alike.

The evidence files are written by `scripts/evidence.py` (`results/<family>/<method>.json`: config, per-(setting, target ratio) summary, one row per prompt).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from reference_impls.bench.readers import json_lines

__all__ = ["show_bench", "show_evidence"]

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
        series = {}
        for r in data["summary"]:
            series.setdefault(r["setting"], []).append((r["achieved_ratio"], r["accuracy"]))
        _plot(series, full, title, "achieved compression ratio (measured bytes)")
    return data


def show_bench(method: str, path: Union[str, Path] = "results/bench/passkey-families-30.jsonl",
               title: Optional[str] = None, plot: bool = True) -> list[dict]:
    """Print and plot one method's cells of a `kvatlas bench` results file (JSON lines; by default every family's
    passkey evidence, both settings): per setting and target, the achieved ratio (16-bit unit), for retrieval
    methods the read ratio (full 16-bit bytes over bytes read per decoded token), accuracy and prompts. The full
    cache's accuracy per setting is drawn as a dashed line; retrieval methods are plotted against the read ratio.
    Returns the method's rows ([] with a message when the file or the method's cells are missing).
    """
    p = _find(path)
    rows = [row for _, row in json_lines(p, "cells")] if p.exists() else []
    mine = sorted((r for r in rows if r["method"] == method), key=lambda r: (r["setting"], r["target_ratio"]))
    if not mine:
        print(f"no cells of {method} in {path}: run kvatlas bench --methods {method} --tasks passkey --output {path}")
        return []
    full = {r["setting"]: r["score"] for r in rows if r["method"] == "full"}
    first = mine[0]
    commits = sorted({r["commit"] for r in mine})  # a resumed run records the commit that finished each cell
    print(f"{first['n']} {first['task']} prompts of {first['length']} tokens per cell; {first['model']}, "
          f"{first['dtype']}; commit{'s' * (len(commits) > 1)} {', '.join(commits)}")
    read = lambda r: r["full_kv_bytes"] / r["read_kv_bytes"] if r.get("read_kv_bytes") else None  # noqa: E731
    print(f"{'setting':16} {'target':>6} {'achieved':>8} {'read':>6} {'n':>3} {'accuracy':>8}")
    series = {}
    for r in mine:
        x = read(r)
        print(f"{r['setting']:16} {r['target_ratio']:6g} {r['achieved_ratio']:8.2f} "
              f"{'-' if x is None else f'{x:.2f}':>6} {r['n']:3d} {r['score']:8.2f}")
        series.setdefault(r["setting"], []).append((x or r["achieved_ratio"], r["score"]))
    print("full cache on the same prompts:", ", ".join(f"{s} {a:.2f}" for s, a in full.items()))
    if plot:
        xlabel = "read ratio (bytes read per token)" if read(first) else "achieved compression ratio (measured bytes)"
        _plot(series, full, title or f"{method}: {first['task']}, {first['n']} prompts (kvatlas bench)", xlabel)
    return mine


def _plot(series: dict, full: dict, title: str, xlabel: str) -> None:
    """Accuracy against the ratio, one line per setting ({setting: [(ratio, accuracy)]}), the full cache dashed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for setting in sorted(series):
        pts = sorted(series[setting])
        line, = ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=setting)
        if setting in full:
            ax.axhline(full[setting], ls="--", lw=1, color=line.get_color(), label=f"full cache, {setting}")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title)
    ax.legend(fontsize=8)
    plt.tight_layout()
    plt.show()


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
