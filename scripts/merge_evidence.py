"""Merge evidence files of one method written by processes that split the prompts (`evidence.py --first`).

    python scripts/merge_evidence.py results/eviction/keyformer.json /tmp/part2/keyformer.json

The first file is overwritten with the union of the rows (one row per prompt, setting and ratio; a prompt
present in both is an error) and a summary recomputed from them.
"""

import json
import sys
from pathlib import Path

from reference_impls.evaluate import summarize


def main(paths: list[str]) -> int:
    if len(paths) < 2:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    parts = [json.loads(Path(p).read_text()) for p in paths]
    rows, seen = [], set()
    for part in parts:
        for r in part["rows"]:
            key = (r["sample"], r["setting"], r["method"], r["target_ratio"])
            if key in seen:
                raise SystemExit(f"{key} appears in more than one file")
            seen.add(key)
            rows.append(r)
    rows.sort(key=lambda r: (r["sample"], r["setting"], r["target_ratio"]))
    config = dict(parts[0]["config"], samples=len({r["sample"] for r in rows}), first_sample=0,
                  ratios=sorted({r["target_ratio"] for r in rows}), settings=sorted({r["setting"] for r in rows}),
                  wall_s=sum(p["config"].get("wall_s", 0) for p in parts),
                  processes=f"{len(parts)} processes over disjoint prompts, merged by scripts/merge_evidence.py")
    Path(paths[0]).write_text(json.dumps({"config": config, "summary": summarize(rows), "rows": rows}, indent=1))
    print(f"{paths[0]}: {config['samples']} prompts, {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
