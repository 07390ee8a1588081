"""The benchmark's leaderboard page, from the JSON-lines files `kvatlas bench` writes (results/bench/*.jsonl).

Pure functions from rows to Markdown and inline SVG, so gen_pages.py stays a list of pages and the tests can
call each piece on hand-made rows. One row is one cell: (method, target ratio, task, length, setting), with
its score, the full cache's score on the same cell, and the bytes the cache held. Every ratio here is in the
16-bit unit of the benchmark seed (Yuan et al., arXiv 2407.01527, §2.5 of the research notes): a bf16/fp16
full cache's bytes over the compressed cache's bytes. The legacy passkey evidence (results/<family>/*.json,
fp32 unit) keeps its own page, `legacy_page`, because its ratios are not comparable with these.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean

UNIT = ("ratios are measured bytes of a 16-bit (bf16/fp16) full cache divided by the bytes the compressed "
        "cache holds (kept tokens, scales, zero-points and any full-precision window included)")
REQUIRED = ("method", "label", "ids", "family", "target_ratio", "achieved_ratio", "task", "category", "length",
            "setting", "score", "full_score", "n", "kv_bytes", "command", "commit")
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354"]


# ---------------------------------------------------------------------------------------------------- rows
#: file-name prefixes of results shown in their own section, not in the main grid's tables: the quick grid
#: (`kvatlas bench --quick`, fewer prompts) and the passkey evidence of every method (`passkey-*.jsonl`, both settings)
APART = ("quick", "passkey-")


def read_jsonl(path: Path, required) -> list[tuple[int, dict]]:
    """(line number, row) of every non-blank line of a JSON-lines results file; a line that is not a JSON object
    or lacks a `required` field stops the build with its file:line."""
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{i}: not a JSON object ({err.msg})") from None
        missing = [k for k in required if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{path}:{i}: missing {', '.join(missing)}")
        out.append((i, row))
    return out


def load_rows(folder: Path, quick: bool = False, group: str | None = None) -> list[dict]:
    """Every cell line of folder/*.jsonl, in file order (the per-sample sidecars `*.samples.jsonl` are not
    cells). `group`: only the files whose name starts with it (one of `APART`; `quick=True` is `group="quick"`),
    else all the others: those re-measure some cells with other prompts, so they are shown apart. A cell measured
    twice (the full cache runs in every shard) is kept once. A bad line stops the build with its file:line: a
    leaderboard that silently drops cells would rank methods on different evidence."""
    group = "quick" if quick else group
    rows, seen = [], set()
    paths = [p for p in sorted(Path(folder).glob("*.jsonl")) if not p.name.endswith(".samples.jsonl")]
    mine = (lambda n: n.startswith(group)) if group else (lambda n: not n.startswith(APART))
    for path in (p for p in paths if mine(p.name)):
        for i, row in read_jsonl(path, REQUIRED):
            key = (row["method"], row["target_ratio"], row["task"], row["length"], row["setting"])
            if key not in seen:
                seen.add(key)
                rows.append(dict(row, source=f"{path.name}:{i}"))
    return rows


def relative(row: dict) -> float | None:
    """Score over the full cache's score on the same cell; None where the full cache was not run (or scored 0)."""
    full = row.get("full_score")
    return row["score"] / full if full else None


def mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return mean(values) if values else None


def by_task(rows: list[dict], key) -> dict[str, float]:
    """Per task, the mean of key(row) over that task's cells (lengths, settings), so every task weighs the same."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["task"]].append(key(r))
    return {t: m for t, vs in groups.items() if (m := mean_or_none(vs)) is not None}


def overall(rows: list[dict]) -> list[dict]:
    """One row per (method, target ratio, setting): means over tasks of score, relative score, achieved ratio."""
    # each task at its main length (the one most cells ran at): a length sweep of a few methods would otherwise
    # move only those methods' means
    lengths = defaultdict(Counter)
    for r in rows:
        lengths[r["task"]][r["length"]] += 1
    main = {t: c.most_common(1)[0][0] for t, c in lengths.items()}
    groups = defaultdict(list)
    for r in rows:
        if not r.get("dropped") and r["length"] == main[r["task"]]:  # dropped: the full cache cannot do the task
            groups[(r["method"], r["target_ratio"], r["setting"])].append(r)
    out = []
    for (method, target, setting), rs in groups.items():
        rel = by_task(rs, relative)
        out.append({"method": method, "ids": rs[0]["ids"], "family": rs[0]["family"], "target_ratio": target,
                    "setting": setting, "score": mean(by_task(rs, lambda r: r["score"]).values()),
                    "relative": mean(rel.values()) if rel else None, "tasks": len({r["task"] for r in rs}),
                    "achieved_ratio": mean(by_task(rs, lambda r: r["achieved_ratio"]).values())})
    return sorted(out, key=lambda o: (o["setting"], o["target_ratio"], -(o["relative"] or 0), o["method"]))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (bytes, score) points no other point dominates: as good a score in no more bytes, and
    strictly better in one of the two. Ties (identical points) are all kept."""
    return [i for i, (b, s) in enumerate(points)
            if not any(b2 <= b and s2 >= s and (b2 < b or s2 > s) for b2, s2 in points)]


# ---------------------------------------------------------------------------------------------------- pieces
def method_md(method: str, ids: list[str], names: dict[str, str], prefix: str = "taxonomy/") -> str:
    """The method string with each part linked to its taxonomy page (ids not in the taxonomy stay plain)."""
    parts = []
    for part, eid in zip(method.split("+"), ids):
        cfg = part.partition(":")[2]
        name = f"[{names[eid]}]({prefix}{eid}.md)" if eid in names else html.escape(eid)
        parts.append(name + (f" `{cfg}`" if cfg else ""))
    return " + ".join(parts)


def method_html(method: str, ids: list[str], names: dict[str, str], prefix: str = "../taxonomy/") -> str:
    """As method_md, for raw HTML blocks (no Markdown inside them): links to the built pages."""
    parts = []
    for part, eid in zip(method.split("+"), ids):
        cfg = part.partition(":")[2]
        name = f'<a href="{prefix}{eid}/">{html.escape(names[eid])}</a>' if eid in names else html.escape(eid)
        parts.append(name + (f" <code>{html.escape(cfg)}</code>" if cfg else ""))
    return " + ".join(parts)


def provenance(rows: list[dict]) -> str:
    """Which command at which commit made these rows: the line under every table and figure."""
    made = sorted({(r["command"], r["commit"]) for r in rows})
    return "<small>Made by " + "; ".join(f"`{c}` at commit `{k}`" for c, k in made) + ".</small>"


def fmt(v, spec: str = ".2f") -> str:
    return "" if v is None else format(v, spec)


def mib(b) -> str:
    return "" if b is None else f"{b / 2**20:.2f}"


def heat_colour(rel: float) -> str:
    """Red (0) through yellow to green (1 or more); dark text, so it reads in both colour schemes."""
    return f"background:hsl({120 * min(max(rel, 0), 1):.0f},65%,78%);color:#111"


# ---------------------------------------------------------------------------------------------------- figures
def score_svg(rows: list[dict], title: str) -> str:
    """Score against measured KV bytes (log axis) for one (task, length, setting): a line per method through
    its ratios, the Pareto front dashed and its points ringed (inline SVG: no script, works offline)."""
    W, H, L, R, T, B = 660, 330, 46, 190, 28, 42
    rs = sorted((r for r in rows if r["kv_bytes"] > 0), key=lambda r: r["kv_bytes"])
    lo, hi = min(r["kv_bytes"] for r in rs) / 1.25, max(r["kv_bytes"] for r in rs) * 1.25
    ymax = max(1.0, max(r["score"] for r in rs))
    X = lambda b: L + (math.log(b) - math.log(lo)) / (math.log(hi) - math.log(lo)) * (W - L - R)
    Y = lambda s: T + (1 - s / ymax) * (H - T - B)
    out = [f'<svg class="kv-chart kv-pareto" viewBox="0 0 {W} {H}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{L}" y="16" class="kv-chart-title">{html.escape(title)}</text>']
    for s in (0, 0.25, 0.5, 0.75, 1):
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{Y(s * ymax):.1f}" y2="{Y(s * ymax):.1f}" class="kv-grid"/>'
                   f'<text x="{L - 6}" y="{Y(s * ymax) + 4:.1f}" text-anchor="end" class="kv-tick">{s * ymax:g}</text>')
    for v in (m * 10.0**k for k in range(-2, 5) for m in (1, 2, 5)):  # 1-2-5 ticks: several even on a narrow range
        b = v * 2**20
        if lo <= b <= hi:
            out.append(f'<line x1="{X(b):.1f}" x2="{X(b):.1f}" y1="{T}" y2="{H - B}" class="kv-grid"/>'
                       f'<text x="{X(b):.1f}" y="{H - B + 15}" text-anchor="middle" class="kv-tick">{v:g}</text>')
    front = [rs[i] for i in pareto_front([(r["kv_bytes"], r["score"]) for r in rs])]
    steps = []  # the front as a staircase: a method at more bytes only counts if it scores higher
    for r in front:
        steps += ([(r["kv_bytes"], steps[-1][1])] if steps else []) + [(r["kv_bytes"], r["score"])]
    out.append('<polyline class="kv-front" fill="none" stroke="currentColor" stroke-dasharray="5 3" points="'
               + " ".join(f"{X(b):.1f},{Y(s):.1f}" for b, s in steps) + '"/>')
    methods = list(dict.fromkeys(r["method"] for r in sorted(rs, key=lambda r: r["method"])))
    for i, m in enumerate(methods):
        c, pts = PALETTE[i % len(PALETTE)], [r for r in rs if r["method"] == m]
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.6" points="'
                   + " ".join(f"{X(r['kv_bytes']):.1f},{Y(r['score']):.1f}" for r in pts) + '"/>')
        for r in pts:
            ring = (f'<circle cx="{X(r["kv_bytes"]):.1f}" cy="{Y(r["score"]):.1f}" r="6.5" fill="none" '
                    f'stroke="{c}" stroke-width="1.4"/>') if r in front else ""
            out.append(f'{ring}<circle cx="{X(r["kv_bytes"]):.1f}" cy="{Y(r["score"]):.1f}" r="3.2" fill="{c}">'
                       f'<title>{html.escape(r["label"])} ({html.escape(r["method"])}): target {r["target_ratio"]:g}x, '
                       f'achieved {r["achieved_ratio"]:.2f}x, {mib(r["kv_bytes"])} MiB, score {r["score"]:.2f} '
                       f'(n={r["n"]}){", on the Pareto front" if r in front else ""}</title></circle>')
        out.append(f'<rect x="{W - R + 12}" y="{T + i * 15 - 8}" width="10" height="3" fill="{c}"/>'
                   f'<text x="{W - R + 26}" y="{T + i * 15 - 3}" class="kv-tick">{html.escape(m[:30])}</text>')
    y = T + len(methods) * 15
    out.append(f'<line x1="{W - R + 12}" x2="{W - R + 22}" y1="{y - 6}" y2="{y - 6}" stroke="currentColor" '
               f'stroke-dasharray="3 2"/><text x="{W - R + 26}" y="{y - 3}" class="kv-tick">Pareto front (ringed)</text>'
               f'<text x="{(L + W - R) / 2}" y="{H - 8}" text-anchor="middle" class="kv-tick">KV-cache bytes held '
               f'(MiB, log scale; fewer is better)</text></svg>')
    return "".join(out)


def heatmap(rows: list[dict], target: float, names: dict[str, str]) -> str:
    """Method x task at one target ratio, each cell the score relative to the full cache (colour and text)."""
    rs = [r for r in rows if r["target_ratio"] == target and r["family"] != "baseline"]
    cols = sorted({(r["task"], r["setting"]) for r in rs})
    cell = defaultdict(list)
    for r in rs:
        cell[(r["method"], r["task"], r["setting"])].append(r)
    methods = sorted({(r["method"], tuple(r["ids"])) for r in rs})
    out = ['<div class="kv-heat-box"><table class="kv-heat"><thead><tr><th>Method</th>'
           + "".join(f"<th>{html.escape(t)}<br><small>{html.escape(s)}</small></th>" for t, s in cols)
           + "</tr></thead><tbody>"]
    for m, ids in methods:
        tds = []
        for t, s in cols:
            cs = cell.get((m, t, s), [])
            rel = mean_or_none(relative(r) for r in cs)
            if rel is None:
                tds.append('<td class="kv-heat-na">—</td>')
                continue
            tip = (f"score {mean(r['score'] for r in cs):.2f}, full cache {mean(r['full_score'] for r in cs):.2f}, "
                   f"achieved {mean(r['achieved_ratio'] for r in cs):.2f}x")
            tds.append(f'<td style="{heat_colour(rel)}" title="{tip}">{rel:.2f}</td>')
        out.append(f"<tr><th>{method_html(m, list(ids), names)}</th>{''.join(tds)}</tr>")
    return "".join(out) + "</tbody></table></div>"


# ---------------------------------------------------------------------------------------------------- page
def setup_lines(rows: list[dict], source: str) -> list[str]:
    """The setup as the rows state it (never assumed): model, dtype, device, batch, commits, timing, commands."""
    def vals(k):
        return ", ".join(sorted({str(r.get(k, "?")) for r in rows}))
    finished = sorted(r["finished"] for r in rows if r.get("finished"))
    lines = [f"**Setup, from the rows.** Model: {vals('model')}; dtype: {vals('dtype')}; device: {vals('device')}; "
             f"batch size: {vals('batch_size')}; commit(s): `{vals('commit')}`; timing: {vals('timing')}"
             + (f"; finished {finished[0]} to {finished[-1]}" if finished else "") + f". {len(rows)} cells read "
             f"from `{source}/*.jsonl`.", "", "A quantizer's ratio follows from its bit width, so its achieved ratio "
             "can sit far from its target (4-bit KIVI with its scales and fp16 window is about 2.8× on 2,000 "
             "tokens): always read the achieved column.", "", "**Commands that produced the files:**", ""]
    return lines + [f"* `{c}`" for c in sorted({r["command"] for r in rows})] + [""]


def fixture_warning(rows: list[dict]) -> list[str]:
    """Rows marked `"fixture": true` (tests/fixtures/bench) are made up: say so wherever they are shown."""
    if not any(r.get("fixture") for r in rows):
        return []
    return ['!!! warning "Made-up rows"', "    These cells come from a test fixture (`\"fixture\": true`), written to "
            "build and test the site before real results exist. Their numbers measure nothing.", ""]


def overall_table(rows: list[dict], names: dict[str, str]) -> list[str]:
    return ['<div class="kv-faceted" data-facets="1,2,3" markdown="1">', "",
            "| Method | Family | Setting | Target ratio (×) | Achieved ratio (×, 16-bit unit) | Mean score "
            "| Mean relative score | Tasks |", "|---|---|---|---|---|---|---|---|"] + [
            f"| {method_md(o['method'], o['ids'], names)} | {o['family']} | {o['setting']} | {o['target_ratio']:g} | "
            f"{o['achieved_ratio']:.2f} | {o['score']:.2f} | {fmt(o['relative'])} | {o['tasks']} |"
            for o in overall(rows)] + ["", "</div>", "", provenance(rows), ""]


def quick_section(rows: list[dict], names: dict[str, str]) -> list[str]:
    """The `--quick` grid's own table: it re-measures some cells of the main grid with fewer prompts."""
    if not rows:
        return []
    tasks = sorted({r["task"] for r in rows})
    methods = len({r["method"] for r in rows})
    return ["## The quick grid", "", f"`kvatlas bench --quick`: {methods} methods at one target ratio on "
            f"{', '.join(tasks)}, {max(r['n'] for r in rows)} prompts per cell (a smoke test of the whole "
            "benchmark on 2 CPU cores; the tables above have more prompts).", ""] + overall_table(
        rows, names)


def passkey_section(rows: list[dict], names: dict[str, str]) -> list[str]:
    """Every method on the passkey set in both settings at each target (the families' evidence): accuracy, the
    achieved ratio, and for retrieval methods the ratio of bytes read per decoded token."""
    if not rows:
        return []
    ns, length = sorted({r["n"] for r in rows}), sorted({r["length"] for r in rows})
    n = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]} to {ns[-1]} (column n)"
    out = ["## Every method on passkey, both settings", "",
           f"{n} passkey prompts of {', '.join(map(str, length))} tokens per cell, query-aware (question prefilled "
           "with the context) and query-agnostic (context compressed before the question arrives), at each "
           "target ratio. Retrieval methods hold the whole cache and read part of it per decoded token: their "
           "achieved ratio is about 1 and the *read* ratio (full 16-bit bytes over bytes read per token) is the "
           "one that reaches the target. Prompt-compression methods' bytes are the shorter prompt's cache.", "",
           '<div class="kv-faceted" data-facets="1,2,3" markdown="1">', "",
           "| Method | Family | Setting | Target (×) | Achieved (×, 16-bit) | Read (×) | Accuracy | Full cache "
           "| Relative | KV MiB | n |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["method"], r["setting"], r["target_ratio"])):
        read = r["full_kv_bytes"] / r["read_kv_bytes"] if r.get("read_kv_bytes") else None
        out.append(f"| {method_md(r['method'], r['ids'], names)} | {r['family']} | {r['setting']} | "
                   f"{r['target_ratio']:g} | {r['achieved_ratio']:.2f} | {fmt(read)} | {r['score']:.2f} | "
                   f"{fmt(r['full_score'])} | {fmt(relative(r))} | {mib(r['kv_bytes'])} | {r['n']} |")
    return out + ["", "</div>", "", provenance(rows), ""]


def leaderboard_page(rows: list[dict], names: dict[str, str], source: str = "results/bench",
                     quick: list[dict] = (), passkey: list[dict] = (), arch: list[dict] = (),
                     arch_links: dict[str, list[str]] | None = None) -> str:
    """leaderboard.md: setup, overall table, per task a table and a Pareto figure, the heatmaps, and the tiny
    architectures trained on the synthetic suite (`arch`, rows of `kvatlas arch-bench`)."""
    archs = architectures_section(list(arch), arch_links or {}, names) if arch else []
    out = ["# Leaderboard", "",
           "Every implemented method, alone and composed, under one setup: the same model, prompts, batch and "
           "machine, each cell's full-cache score beside it. Methods link to their taxonomy pages; the "
           "[findings](findings.md) page checks the benchmark seed's conclusions on these rows; the older "
           "passkey-only measurements (fp32 unit) are on the [per-method evidence](evidence.md) page.", "",
           f"**Unit.** All {UNIT}: the 16-bit unit of the benchmark seed (arXiv 2407.01527).", ""]
    if not rows and quick:
        return "\n".join(out + fixture_warning(quick) + setup_lines(quick, source) + quick_section(list(quick), names)
                         + archs)
    if not rows:
        return "\n".join(out + [
            f"**No benchmark results yet**: `{source}/` holds no `*.jsonl` file. Produce them with "
            "`kvatlas bench --quick` (a small grid on CPU; `kvatlas bench --help` for the full one), which writes "
            f"`{source}/<name>.jsonl`, then rebuild the site. `KVATLAS_BENCH_RESULTS=<folder>` points the build "
            "at another folder.", ""] + archs)
    out += fixture_warning(rows) + setup_lines(rows, source)
    out += ["## Overall", "", "Per method and target ratio: the mean over tasks (each task at its main length, "
            "the one most cells ran at; tasks the full cache cannot do left out) of the score, of the score "
            "relative to the full cache on the same cell, and of the achieved ratio. Filter with the menus; sort by "
            "clicking a header. Other lengths are in the per-task tables.", ""] + overall_table(rows, names)
    for task in sorted({r["task"] for r in rows}):
        rs = [r for r in rows if r["task"] == task]
        out += [f"## Task: {task}", "", f"Category: {rs[0]['category']}; metric: `{rs[0].get('metric', '?')}`; "
                f"mean prompt tokens {fmt(mean_or_none(r.get('prompt_tokens') for r in rs), '.0f') or '?'}.", ""]
        for key in sorted({(r["length"], r["setting"]) for r in rs}):
            cells = [r for r in rs if (r["length"], r["setting"]) == key]
            out += [score_svg(cells, f"{task}, {key[0]} tokens, {key[1]}: score vs KV bytes"), "",
                    provenance(cells), ""]
        out += ['<div class="kv-faceted" data-facets="1,2,4" markdown="1">', "",
                "| Method | Family | Setting | Length | Target (×) | Achieved (×, 16-bit) | Score | Full cache "
                "score | Relative | KV MiB | Peak KV MiB | Prefill s | Decode tok/s | Hit limit | n |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rs, key=lambda r: (r["setting"], r["length"], r["target_ratio"], -r["score"], r["method"])):
            out.append(f"| {method_md(r['method'], r['ids'], names)} | {r['family']} | {r['setting']} | {r['length']} "
                       f"| {r['target_ratio']:g} | {r['achieved_ratio']:.2f} | {r['score']:.2f} | "
                       f"{fmt(r['full_score'])} | {fmt(relative(r))} | {mib(r['kv_bytes'])} | "
                       f"{mib(r.get('peak_kv_bytes'))} | {fmt(r.get('prefill_s'))} | "
                       f"{fmt(r.get('decode_tokens_per_s'), '.1f')} | {r.get('hit_limit', '')} | {r['n']} |")
        out += ["", "</div>", "", provenance(rs), ""]
    out += ["## Method × task", "", "Score relative to the full cache on the same cell (1 = as good as the full "
            "cache), one table per target ratio; hover a cell for its score and achieved ratio.", ""]
    for target in sorted({r["target_ratio"] for r in rows if r["family"] != "baseline"}):
        rs = [r for r in rows if r["target_ratio"] == target]
        out += [f"### Target {target:g}×", "", heatmap(rows, target, names), "", provenance(rs), ""]
    out += ["Times are wall times of the `device` named above; the `timing` field says whether they come from "
            "an accuracy pass on shared cores or a timing pass run alone.", ""]
    return "\n".join(out + passkey_section(list(passkey), names) + quick_section(list(quick), names) + archs)


# ---------------------------------------------------------------------------------------------------- legacy
def accuracy_svg(rows: list[tuple[str, dict]], setting: str) -> str:
    """Passkey accuracy against the achieved ratio (fp32 unit, log axis), one line per method (inline SVG)."""
    W, H, L, R, T, B = 640, 340, 50, 150, 28, 40
    rs = [(fam, s) for fam, s in rows if s["setting"] == setting and s["achieved_ratio"] > 0]
    xmax = max(max(s["achieved_ratio"] for _, s in rs), 8.5)
    xmin = min(min(s["achieved_ratio"] for _, s in rs), 1.0) * 0.95
    X = lambda r: L + (math.log(r) - math.log(xmin)) / (math.log(xmax) - math.log(xmin)) * (W - L - R)
    Y = lambda a: T + (1 - a) * (H - T - B)
    out = [f'<svg class="kv-chart" viewBox="0 0 {W} {H}" role="img" aria-label="accuracy vs ratio, {setting}">',
           f'<text x="{L}" y="16" class="kv-chart-title">{setting}: passkey accuracy vs achieved ratio (fp32 unit)</text>']
    for a in (0, 0.25, 0.5, 0.75, 1):
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{Y(a):.1f}" y2="{Y(a):.1f}" class="kv-grid"/>'
                   f'<text x="{L - 6}" y="{Y(a) + 4:.1f}" text-anchor="end" class="kv-tick">{a:g}</text>')
    for r in (1, 1.25, 1.5, 2, 4, 8, 16):
        if xmin <= r <= xmax:
            out.append(f'<line x1="{X(r):.1f}" x2="{X(r):.1f}" y1="{T}" y2="{H - B}" class="kv-grid"/>'
                       f'<text x="{X(r):.1f}" y="{H - B + 16}" text-anchor="middle" class="kv-tick">{r:g}x</text>')
    for i, m in enumerate(sorted({s["method"] for _, s in rs})):
        pts = sorted((s["achieved_ratio"], s["accuracy"], s["target_ratio"], s["n"]) for _, s in rs if s["method"] == m)
        c = PALETTE[i % len(PALETTE)]
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.6" points="'
                   + " ".join(f"{X(x):.1f},{Y(a):.1f}" for x, a, _, _ in pts) + '"/>')
        for x, a, t, n in pts:
            out.append(f'<circle cx="{X(x):.1f}" cy="{Y(a):.1f}" r="3" fill="{c}"><title>{m}: target {t:g}x, '
                       f'achieved {x:.2f}x (fp32 unit), accuracy {a:.2f} (n={n})</title></circle>')
        out.append(f'<rect x="{W - R + 10}" y="{T + i * 15 - 8}" width="10" height="3" fill="{c}"/>'
                   f'<text x="{W - R + 24}" y="{T + i * 15 - 3}" class="kv-tick">{m}</text>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 6}" text-anchor="middle" class="kv-tick">achieved compression '
               f'ratio (fp32 full cache bytes / bytes held, log scale)</text></svg>')
    return "".join(out)


def legacy_page(summary_rows: list[tuple[str, dict]], configs: dict[str, dict]) -> str:
    """evidence.md: the passkey runs of scripts/evidence.py (results/<family>/<id>.json), fp32 unit."""
    out = ["# Per-method evidence (passkey, fp32 unit, legacy)", "",
           '!!! note "Unit: fp32, not the leaderboard\'s 16-bit unit"',
           "    These ratios are full-cache bytes **in fp32** over the bytes the compressed cache holds, because "
           "these runs kept the model in fp32. A quantizer's ratio here is about **twice** its ratio in the "
           "16-bit unit of the [leaderboard](leaderboard.md): it holds the same codes and scales while the full "
           "cache it is divided into is twice as large (fp8's 4.0× below is 2.0× there; KIVI at target 4, 4.26× here, "
           "is about 2.1×). An eviction method's ratio is the same in both units. Do not rank these numbers "
           "with the leaderboard's.", "",
           "Every implemented method under one setup: the embedded SmolLM2-135M-Instruct (fp32, CPU), the same "
           "synthetic passkey prompts, batch 1, greedy decoding. Each prompt is prefilled once and every method "
           "compresses from that same prefill (`reference_impls.evaluate`). **Achieved** ratios are measured from "
           "the bytes each cache holds (kept indices, scales and any full-precision window included), shown next "
           "to the target. Times are CPU wall times on the machine that produced the file. The full cache on the "
           "same prompts is the `full` row.", ""]
    if not summary_rows:
        return "\n".join(out + ["No results yet: run `python scripts/evidence.py --methods <ids>`.", ""])
    targets = sorted({s["target_ratio"] for _, s in summary_rows})
    for setting in ("query-agnostic", "query-aware"):
        rs = [(fam, s) for fam, s in summary_rows if s["setting"] == setting]
        if not rs:
            continue
        out += [f"## {setting}", "", accuracy_svg(summary_rows, setting), "",
                "Passkey accuracy per target ratio (achieved ratio, fp32 unit, in brackets).", "",
                "| Family | Method | n | " + " | ".join(f"{t:g}x" for t in targets) + " |",
                "|---|---|---|" + "---|" * len(targets)]
        for fam, m in sorted({(f, s["method"]) for f, s in rs}):
            cells = {s["target_ratio"]: s for f, s in rs if s["method"] == m and f == fam}
            out.append(f"| {fam} | [{m}](taxonomy/{m}.md) | {max(s['n'] for s in cells.values())} | " + " | ".join(
                f"{cells[t]['accuracy']:.2f} ({cells[t]['achieved_ratio']:.2f})" if t in cells else ""
                for t in targets) + " |")
        out += ["", f"### All figures, {setting}", "", '<div class="kv-faceted" data-facets="0,1,2" markdown="1">', "",
                "| Family | Method | Target ratio | Achieved ratio (×, fp32 unit) | Passkey accuracy | Prefill s "
                "| Decode tok/s | n |", "|---|---|---|---|---|---|---|---|"]
        for fam, s in sorted(rs, key=lambda x: (x[1]["method"], x[1]["target_ratio"])):
            out.append(f"| {fam} | [{s['method']}](taxonomy/{s['method']}.md) | {s['target_ratio']:g} | "
                       f"{s['achieved_ratio']:.2f} | {s['accuracy']:.2f} | {s['prefill_s']:.2f} | "
                       f"{fmt(s.get('decode_tokens_per_s'), '.1f')} | {s['n']} |")
        out += ["", "</div>", ""]
    out += ["## Setup of each results file", ""]
    out += [f"* `results/{name}`: " + ", ".join(f"{k}={v}" for k, v in cfg.items()) for name, cfg in configs.items()]
    out += ["", "Reproduce: `python scripts/evidence.py --methods <id,...> --samples 30 --tokens 1500 "
            "[--ratios 2,4,8]` writes `results/<family>/<id>.json`, which this page reads at build time.", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- how to run
#: measured wall times of the checked-in runs (2 CPU cores, nothing else running unless said), for the page below
RUN_TIMES = {
    "grid.jsonl (21 methods x 2/4/8x x 10 tasks, 5 kept, 6 prompts)": "two shards of 1 thread each in parallel, 60 and "
    "62 minutes (2026-12-05; notebook execution shared the cores for the first 15 minutes), then its timing pass "
    "alone at 4x (3 repeats), 6.5 minutes",
    "grid-paper.jsonl (SnapKV's paper preset, alone and + KIVI)": "12 minutes on 1 thread (shared)",
    "agnostic.jsonl (every method, passkey, 4x, query-agnostic)": "10 minutes on 1 thread (shared)",
    "lengths.jsonl (passkey at 1k-6k tokens)": "4 minutes on 2 threads",
    "quick.jsonl (`kvatlas bench --quick`)": "8 min 25 s from a clean clone on 2 cores, alone (after `make install`, 56 s; the converted model already in ~/.cache/kvatlas)",
}


def howto_page(tasks: dict, rows: list[dict]) -> str:
    """benchmark.md: what `kvatlas bench` measures, its tasks (with the full cache's score from the rows), and
    the commands, including shards, GPUs and users' own data."""
    full = defaultdict(list)
    for r in rows:
        if r["method"] == "full":
            full[r["task"]].append(r)
    out = ["# Running the benchmark", "",
           "`kvatlas bench` runs methods × target ratios × tasks × settings on one model, batch size (1), dtype "
           "and machine, and writes one JSON line per cell. Every prompt is prefilled once; every method "
           "compresses from that same prefill (`reference_impls.replay`), so methods differ only in what they "
           f"keep and how they store it. **Unit:** {UNIT}; the model runs in bf16 by default, so a quantizer's "
           "ratio is never inflated by an fp32 baseline (KIVI-4 is about 2.8x at 1.5k tokens, not 4x).", "",
           "## Tasks", "",
           "One task per category of the benchmark seed (arXiv 2407.01527) where the embedded SmolLM2-135M can "
           "do it, generated here from text that ships with Python (`reference_impls/bench/`). A task is "
           "benchmarked only where the full cache scores at least 0.6 on it; the full cache's score is in the "
           "last column (from the checked-in rows) and beside every row of the leaderboard.", "",
           "| Task | Seed category | Metric | Max new tokens | Default lengths | Full cache (checked-in rows) |",
           "|---|---|---|---|---|---|"]
    for name, t in tasks.items():
        fs = full.get(name, [])
        score = ", ".join(f"{r['score']:.2f} at {r['length']} ({r['setting']}, n={r['n']})"
                          + (" — dropped" if r.get("dropped") else "") for r in fs) or "not run"
        out.append(f"| `{name}` | {t.category} | `{t.metric}` | {t.max_new_tokens} | "
                   f"{', '.join(map(str, t.lengths))} | {score} |")
    out += ["", "Users' data: `--task jsonl:PATH` reads the lines `kvatlas generate` reads (`context`, `question`, "
            "`answer`, optional `answer_prefix`; scored by whether the answer appears); `--task longbench:PATH` "
            "and `--task ruler:PATH` read those benchmarks' JSONL files (each dataset with its own metric), so the "
            "seed's own benchmark runs with one command on a GPU.", "",
            "## Commands", "", "```bash",
            "kvatlas bench --quick                                   # every method, reduced grid, <= 20 min on 2 CPU cores",
            "kvatlas bench --methods snapkv,h2o,kivi --ratios 2,4,8 --tasks passkey,docqa",
            "kvatlas bench --methods \"snapkv:window=32,kernel_size=7,pooling=max+kivi:bits=4\" --task jsonl:my.jsonl",
            "kvatlas bench --shard 0/2 --threads 1 --no-timing ...   # job arrays; then",
            "python scripts/merge_bench.py results/bench/grid.jsonl  # and, alone on the machine:",
            "kvatlas bench --timing-only --ratios 4 ...              # medians of 3 timed repeats",
            "kvatlas bench --device cuda --model Qwen/Qwen2.5-7B-Instruct --task longbench:qasper.jsonl",
            "```", "",
            "A cell is written when its prompts are done; the per-sample answers go to `<output>.samples.jsonl` as "
            "they finish. Running the same command again resumes (finished cells and samples are not redone). "
            "`--device auto` spreads a big model with accelerate's `device_map=\"auto\"`.", "",
            "## The checked-in runs", ""]
    cmds = sorted({(r["command"], r["commit"]) for r in rows})
    out += [f"* `{c}` at commit `{k}`" for c, k in cmds] or ["* none yet"]
    out += ["", "Wall times: " + "; ".join(f"{k}: {v}" for k, v in RUN_TIMES.items()) + ".", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- architectures
#: fields every line of results/architectures/bench.jsonl (`kvatlas arch-bench`) must have
ARCH_REQUIRED = ("arch", "params", "lengths", "train_length", "bytes_per_token", "constant_state", "accuracy",
                 "train_s", "threads", "command", "commit")


def load_arch_rows(path: Path) -> list[dict]:
    """The lines of `kvatlas arch-bench`'s output, one per architecture (none if the file does not exist); a bad
    line stops the build with its file:line."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = [dict(row, source=f"{path.name}:{i}") for i, row in read_jsonl(path, ARCH_REQUIRED)]
    return rows


def arch_entries(entries) -> dict[str, list[str]]:
    """Architecture name (its module's file name under reference_impls.architectures) -> the entries that link it
    in their `architecture` field (several may: RetNet and GLA share `linear`), the one named like it first."""
    out: dict[str, list[str]] = defaultdict(list)
    for e in sorted(entries, key=lambda e: e.id):
        if getattr(e, "architecture", None):
            module = e.architecture.split(".")[2]
            out[module].insert(0, e.id) if e.id == module else out[module].append(e.id)
    return dict(out)


def _per_length(values: dict, lengths: list[int], spec: str) -> str:
    return " / ".join(fmt(values.get(str(n)), spec) or "–" for n in lengths)


def arch_table(rows: list[dict], links: dict[str, list[str]], names: dict[str, str], prefix: str = "taxonomy/"
               ) -> list[str]:
    """One row per architecture: parameters, cache bytes per token at each length (a constant state: its bytes),
    exact-match accuracy of each task at each length, training time."""
    lengths = rows[0]["lengths"]
    tasks = list(dict.fromkeys(t for r in rows for t in r["accuracy"]))
    at = " / ".join(map(str, lengths))
    out = ["| Architecture | Params | Cache bytes per token (16-bit) at " + at + " | "
           + " | ".join(f"{t.capitalize()} accuracy at {at}" for t in tasks) + " | Train s (wall / CPU) | Threads |",
           "|---|---|---|" + "---|" * len(tasks) + "---|---|"]
    for r in rows:
        entries = [f"[{names[e]}]({prefix}{e}.md)" for e in links.get(r["arch"], []) if e in names]
        name = f"`{r['arch']}`" + (f" ({', '.join(entries)})" if entries else "")
        cache = (f"constant state, {r['state_bytes']:,} B" if r["constant_state"] and r.get("state_bytes") is not None
                 else _per_length(r["bytes_per_token"], lengths, ".0f"))
        out.append(f"| {name} | {r['params']:,} | {cache} | "
                   + " | ".join(_per_length(r["accuracy"].get(t, {}), lengths, ".2f") for t in tasks)
                   + f" | {r['train_s']:.0f} / {fmt(r.get('train_cpu_s'), '.0f') or '?'}"
                   + f"{' (cached)' if r.get('cached') else ''} | {r['threads']} |")
    return out


def architectures_section(rows: list[dict], links: dict[str, list[str]], names: dict[str, str]) -> list[str]:
    """The leaderboard's "Architectures" section: tiny models trained from scratch on the synthetic suite."""
    out = ["## Architectures", ""]
    L = sorted({r["train_length"] for r in rows})
    steps = sorted({r.get("train", {}).get("steps") for r in rows}, key=str)
    seeds = sorted({r.get("train", {}).get("seed") for r in rows}, key=str)
    budget = sorted({r.get("budget") for r in rows}, key=str)
    out += [f"Architectures that shrink the cache by design, each a small model trained from scratch on CPU on the "
            "synthetic suite (associative recall in the style of Zoology's MQAR, selective copying as in Mamba, a "
            f"passkey in filler): the same parameter budget ({', '.join(f'{b:,}' for b in budget if b)} parameters, "
            f"matched within 10% by the MLP width), steps ({', '.join(map(str, steps))}), optimiser and seed "
            f"({', '.join(map(str, seeds))}), trained on lengths up to L = {', '.join(map(str, L))} and evaluated at "
            f"{', '.join(map(str, rows[0]['lengths']))} tokens (the last two beyond the training length). "
            "Accuracy is exact match of the answer (teacher-forced, the same as greedy decoding for an exact "
            "match). Cache bytes are measured from the tensors each layer's cache holds after a prefill of that "
            "length, in a bf16 copy of the model (the atlas's 16-bit unit); a cache that no longer grows with the "
            "sequence (a recurrent state, or a local window already full) shows its size. These models are tiny "
            "and trained for minutes with one seed: the table compares architectures under one small budget, not "
            "the papers' models. `notebooks/arch_compare.py` plots bytes per token against recall at each length "
            "and sets the papers' and the benchmark seed's findings beside these.", ""]
    out += arch_table(rows, links, names) + ["", provenance(rows), ""]
    return out


def arch_entry_section(path: str, notebook: str, rows: list[dict]) -> list[str]:
    """An entry page's "Architecture module" section: the module of its `architecture` field (a class, function
    or module under reference_impls.architectures) with its API page and notebook, and the module's row of
    `kvatlas arch-bench` when there is one. `notebook`: the notebook's page, relative to the site's root."""
    import importlib

    try:
        importlib.import_module(path)
        module, obj = path, None
    except ImportError:
        module, obj = path.rsplit(".", 1)
    out = ["## Architecture module", "", f"`{path}` — [API and source](../api/{module}.md), [notebook](../{notebook}). "
           "This entry changes the model itself, so it is not a cache method that runs on a trained model: its "
           "module is a small layer of its own, trained from scratch, with a cache whose bytes are measured from "
           "the tensors it holds.", ""]
    if obj:
        out += ["```python", f"from {module} import {obj}", "```", ""]
    mine = [r for r in rows if r["arch"] == module.split(".")[2]]
    if mine:
        out += ["### Trained on the synthetic suite", "", f"`kvatlas arch-bench` trains the module as "
                f"`build(\"{mine[0]['arch']}\", cfg)` builds it (its default configuration) at the shared parameter "
                f"budget, at lengths up to {mine[0]['train_length']}; every architecture is in the "
                "[leaderboard](../leaderboard.md#architectures)'s table.", ""]
        out += arch_table(mine, {}, {}) + ["", provenance(mine), ""]
    return out
