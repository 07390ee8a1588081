"""Merge the shard files of a `kvatlas bench --shard i/n` run into one cells file and one sidecar.

    python scripts/merge_bench.py results/bench/grid.jsonl   # reads grid.shard*of*.jsonl (+ .samples.jsonl)

Cells are keyed by (method, ratio, task, length, setting): the full cache, which every shard runs, is kept
once (the first shard's). Cells already in the target file are kept and the shards' new cells appended, so a
grid can grow in several runs. Written atomically; the shard files are left in place (delete them by hand).
"""

import sys
from pathlib import Path

from reference_impls.bench.run import write_rows, read_rows


def main(target: str) -> int:
    out = Path(target)
    shards = sorted(out.parent.glob(f"{out.stem}.shard*of*{out.suffix}"))
    shards = [s for s in shards if not s.name.endswith(".samples.jsonl")]
    if not shards:
        print(f"merge_bench: no {out.stem}.shard*of*{out.suffix} next to {out}", file=sys.stderr)
        return 2
    cells = {r["cell"]: r for r in read_rows(out)}
    side_path = out.with_name(out.stem + ".samples.jsonl")
    samples = {(r["cell"], r["sample"]): r for r in read_rows(side_path)}
    for shard in shards:
        for r in read_rows(shard):
            cells.setdefault(r["cell"], r)
        for r in read_rows(shard.with_name(shard.stem + ".samples.jsonl")):
            samples.setdefault((r["cell"], r["sample"]), r)
    write_rows(out, list(cells.values()))
    write_rows(side_path, list(samples.values()))
    print(f"merge_bench: {len(cells)} cells, {len(samples)} samples from {len(shards)} shard files -> {out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]) if len(sys.argv) == 2 else print(__doc__) or 2)
