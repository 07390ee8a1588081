"""Generate the site's data-driven pages at build time (run by mkdocs-gen-files; see mkdocs.yml).

Pages: the taxonomy browser (family diagram + faceted, sortable table), one page per family, one page per
entry (axes, the paper's results beside this atlas's measured ones, BibTeX), the compare page, the
vocabulary, the two seeds' crosswalk, the leaderboard and the seed's findings from results/bench/*.jsonl
(scripts/leaderboard.py, scripts/findings.py; KVATLAS_BENCH_RESULTS=<folder> reads another folder) with the tiny
architectures of results/architectures/bench.jsonl (`kvatlas arch-bench`), the legacy
per-method passkey evidence from results/<family>/*.json, the API reference (one page per module),
the notebooks (their executed copies from notebooks/executed/, see scripts/execute_notebooks.py), the
downloads (atlas.json, atlas.csv, atlas.bib), the nav (nav.txt, for literate-nav), and pages.json: every page this build must have,
which scripts/check_site.py compares with the built site.

KVATLAS_EXECUTE_NOTEBOOKS=false: a quick layout build; a notebook whose executed copy is stale or missing is
shown without outputs (the default build fails on one instead: run `make notebooks`).
"""

from __future__ import annotations

import html
import json
import os
import pkgutil
import sys
from collections import Counter, defaultdict
from pathlib import Path

import mkdocs_gen_files

from reference_impls.atlas.schema import VOCAB
from reference_impls.atlas.validate import load_entries

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import execute_notebooks  # noqa: E402

entries, problems = load_entries()
if problems:
    raise SystemExit("taxonomy has problems; run `kvatlas validate`:\n" + "\n".join(map(str, problems)))
entries.sort(key=lambda e: (e.principle, e.year, e.name.lower()))
by_id = {e.id: e for e in entries}
nav = mkdocs_gen_files.Nav()
pages: list[str] = ["index.md"]  # every page of the site, for pages.json


def write(path: str, text: str, edit: str | None = None) -> None:
    with mkdocs_gen_files.open(path, "w") as f:
        f.write(text)
    if edit:
        mkdocs_gen_files.set_edit_path(path, edit)
    if path.endswith((".md", ".ipynb", ".py")):
        pages.append(path)


# ---------------------------------------------------------------------------------------------------- notebooks
# Which file each notebook page is made from: its executed copy when up to date, else (quick builds only) the
# source without outputs.
QUICK = os.environ.get("KVATLAS_EXECUTE_NOTEBOOKS", "true").lower() in ("0", "false", "no")
notebook_file: dict[str, str] = {}
for _name in execute_notebooks.all_names():
    _state = execute_notebooks.state(_name)
    if _state == "up to date":
        notebook_file[_name] = f"notebooks/{_name}.ipynb"
    elif QUICK:
        notebook_file[_name] = f"notebooks/{_name}.py"
    else:
        raise SystemExit(f"notebooks/executed/{_name}.ipynb is {_state}: run `make notebooks` "
                         f"(or build with KVATLAS_EXECUTE_NOTEBOOKS=false to show it without outputs)")

# ---------------------------------------------------------------------------------------------------- results
# Every results/<family>/<id>.json: its setup, and each summary row (one per setting x target ratio).
summary_rows: list[tuple[str, dict]] = []
configs: dict[str, dict] = {}
measured: dict[str, list[dict]] = defaultdict(list)  # entry id -> its summary rows
measured_file: dict[str, str] = {}
for _path in sorted((ROOT / "results").glob("*/*.json")):
    _data = json.loads(_path.read_text())
    _rel = f"{_path.parent.name}/{_path.name}"
    configs[_rel] = _data.get("config", {})
    for _s in _data.get("summary", []):
        summary_rows.append((_path.parent.name, _s))
        measured[_s["method"]].append(_s)
        measured_file[_s["method"]] = _rel
full_accuracy = {s["setting"]: s["accuracy"] for s in measured.get("full", [])}

import findings  # noqa: E402
import leaderboard  # noqa: E402

# The benchmark's rows (results/bench/*.jsonl unless KVATLAS_BENCH_RESULTS names another folder); a line that does
# not parse stops the build with its file:line (leaderboard.load_rows).
BENCH = Path(os.environ.get("KVATLAS_BENCH_RESULTS", "results/bench"))
BENCH = BENCH if BENCH.is_absolute() else ROOT / BENCH
BENCH_REL = BENCH.relative_to(ROOT).as_posix() if BENCH.is_relative_to(ROOT) else str(BENCH)
bench_rows = leaderboard.load_rows(BENCH)
quick_rows = leaderboard.load_rows(BENCH, quick=True)
passkey_rows = leaderboard.load_rows(BENCH, group="passkey-")
names = {e.id: e.name for e in entries}
# The tiny architectures trained on the synthetic suite (`kvatlas arch-bench`), one line per architecture
arch_rows = leaderboard.load_arch_rows(ROOT / "results" / "architectures" / "bench.jsonl")
arch_links = leaderboard.arch_entries(entries)


def link(eid: str, prefix: str = "") -> str:
    e = by_id.get(eid)
    return f"[{e.name}]({prefix}{eid}.md)" if e else eid


def family_svg(counts: Counter) -> str:
    """The families as a tree of boxes, one per principle, with entry counts (inline SVG: works offline)."""
    principles = list(VOCAB["principle"])
    cols, w, h, gap, top, row_gap = 4, 170, 48, 14, 100, 22
    width = cols * (w + gap) + gap
    rows_n = -(-len(principles) // cols)
    parts = [f'<svg class="kv-families" viewBox="0 0 {width} {top + rows_n * (h + row_gap) + 10}" role="img" '
             f'aria-label="KV-cache compression families">',
             f'<rect x="{width / 2 - 130}" y="8" width="260" height="40" rx="8" class="kv-root"/>',
             f'<text x="{width / 2}" y="33" text-anchor="middle" class="kv-root-text">KV-cache compression</text>']
    for i, p in enumerate(principles):
        x = gap + (i % cols) * (w + gap)
        y = top + (i // cols) * (h + row_gap)
        parts.insert(1, f'<path d="M{width / 2},48 C{width / 2},80 {x + w / 2},70 {x + w / 2},{y}" class="kv-edge"/>')
        # xlink:href, not href: Material's instant navigation rewrites every [href], which an SVG <a> refuses
        opening, closing = (f'<a xlink:href="../families/{p}/">', "</a>") if counts.get(p) else ("<g>", "</g>")
        parts.append(f'{opening}<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6" class="kv-node"/>'
                     f'<text x="{x + w / 2}" y="{y + 21}" text-anchor="middle" class="kv-node-text">{p}</text>'
                     f'<text x="{x + w / 2}" y="{y + 38}" text-anchor="middle" class="kv-node-count">'
                     f'{counts.get(p, 0)} entries</text>{closing}')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------- browser
counts = Counter(e.principle for e in entries)
rows = []
for e in entries:
    impl = "yes" if e.implementation else "no"
    rows.append(
        f"<tr><td><a href=\"{e.id}/\">{html.escape(e.name)}</a></td><td>{e.principle}</td>"
        f"<td>{', '.join(e.dimensions)}</td><td>{e.training}</td><td>{e.phase}</td>"
        f"<td>{'yes' if e.query_aware else 'no'}</td><td>{e.year}</td><td>{impl}</td>"
        f"<td>{html.escape(e.venue or '')}</td></tr>")
table = ("<div class=\"kv-faceted\" data-facets=\"1,2,3,4,5,7\">\n<table class=\"kv-table\">\n"
         "<thead><tr><th>Method</th><th>Principle</th><th>Dimensions</th><th>Training</th><th>Phase</th>"
         "<th>Query-aware</th><th data-sort=\"number\">Year</th><th>Implemented</th><th>Venue</th></tr></thead>\n"
         "<tbody>\n" + "\n".join(rows) + "\n</tbody></table>\n</div>")
from reference_impls.atlas.lineage import family_svg as lineage_svg  # noqa: E402

sections = []
for p, definition in VOCAB["principle"].items():
    mine = [e for e in entries if e.principle == p]
    if mine:
        items = ", ".join(link(e.id) for e in mine)
        sections.append(f"### {p} {{#p-{p}}}\n\n{definition} [The family's page](../families/{p}.md).\n\n{items}\n")
write("taxonomy/index.md", f"""# The taxonomy

{len(entries)} methods, {sum(1 for e in entries if e.implementation)} with a tested reference implementation.
Each method is filed by the survey seed's three axes (Javidnia et al., arXiv 2503.11816): the **principle**
it uses, the **dimension** of the cache it shrinks, and the **training** it needs; the vocabulary is defined
on [its own page](vocabulary.md), and [the two seeds](../seeds.md) page relates this to the benchmark seed's
families.

{family_svg(counts)}

## Browse

Filter with the menus above the table (a column's menu lists its values; "Dimensions" matches any listed
dimension) and sort by clicking a column header.

{table}

## By principle

{chr(10).join(sections)}
""")
nav["Taxonomy"] = "taxonomy/index.md"

# ---------------------------------------------------------------------------------------------------- entries
def measured_section(e) -> list[str]:
    """This atlas's own measurements of the method, each table in its unit: the benchmark's (16-bit) and the
    legacy passkey runs' (fp32), or why there are none."""
    rows = sorted(measured.get(e.id, []), key=lambda s: (s["setting"], s["target_ratio"]))
    bench = leaderboard.overall([r for r in bench_rows if e.id in r["ids"]])
    passkey = [r for r in passkey_rows if e.id in r["ids"]]
    out = ["### Measured by this atlas", ""]
    if not rows and not bench and not passkey and e.architecture and not e.implementation:
        return out + ["As an architecture trained from scratch on the synthetic suite: see "
                      "[Architecture module](#architecture-module) above.", ""]
    if not rows and not bench and not passkey:
        out += ["Not measured yet: " + ("the method has no reference implementation in kvatlas." if not e.implementation
                else "no results file; run `kvatlas bench --methods " + e.id + "`."), ""]
        return out
    if bench:
        out += ["In the benchmark, alone and in compositions (means over tasks; ratios in the 16-bit unit: a bf16/fp16 "
                "full cache's bytes over the bytes held). Every cell, with the full cache's score beside it, is on "
                "the [leaderboard](../leaderboard.md)."
                + (f" **Made-up rows** from `{BENCH_REL}`, for building the site: they measure nothing."
                   if any(r.get("fixture") for r in bench_rows) else ""), "",
                "| Method | Setting | Target ratio (×) | Achieved ratio (×, 16-bit unit) | Mean score | Mean relative "
                "score | Tasks |", "|---|---|---|---|---|---|---|"]
        out += [f"| {leaderboard.method_md(o['method'], o['ids'], names, '')} | {o['setting']} | {o['target_ratio']:g} "
                f"| {o['achieved_ratio']:.2f} | {o['score']:.2f} | {leaderboard.fmt(o['relative'])} | {o['tasks']} |"
                for o in bench] + [""]
    if passkey:
        out += [f"On the passkey set ({max(r['n'] for r in passkey)} prompts, both settings; 16-bit unit; the "
                "[leaderboard](../leaderboard.md#every-method-on-passkey-both-settings) has every method):", "",
                "| Method | Setting | Target (×) | Achieved (×) | Read (×) | Accuracy | Full cache |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {leaderboard.method_md(r['method'], r['ids'], names, '')} | {r['setting']} | {r['target_ratio']:g} "
                f"| {r['achieved_ratio']:.2f} | "
                f"{leaderboard.fmt(r['full_kv_bytes'] / r['read_kv_bytes'] if r.get('read_kv_bytes') else None)} | "
                f"{r['score']:.2f} | {leaderboard.fmt(r['full_score'])} |"
                for r in sorted(passkey, key=lambda r: (r["method"], r["setting"], r["target_ratio"]))] + [""]
    if not rows:
        return out
    cfg = configs.get(measured_file[e.id], {})
    out += ["Legacy passkey evidence, **fp32 unit** (a quantizer's ratio here is about twice its 16-bit ratio): "
            f"{cfg.get('model', 'the embedded model')}, {cfg.get('samples', '?')} synthetic passkey prompts of "
            f"~{cfg.get('tokens', '?')} tokens, greedy decoding, batch 1; {cfg.get('machine', '')}. Source: "
            f"`results/{measured_file[e.id]}`; every method under this setup on the "
            "[per-method evidence](../evidence.md) page.",
            "",
            "| Setting | Target ratio (×) | Achieved ratio (×, measured bytes, fp32 unit) | Passkey accuracy (fraction "
            "of prompts) | Full cache accuracy | Prefill (s) | Decode (tokens/s) | Prompts |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dec = r.get("decode_tokens_per_s")
        fa = full_accuracy.get(r["setting"])
        out.append(f"| {r['setting']} | {r['target_ratio']:g} | {r['achieved_ratio']:.2f} | {r['accuracy']:.2f} | "
                   f"{'' if fa is None else f'{fa:.2f}'} | {r['prefill_s']:.2f} | "
                   f"{'' if dec is None else f'{dec:.1f}'} | {r['n']} |")
    out += ["", "Ratios are full-cache bytes (fp32) over the bytes the compressed cache holds; times are CPU wall "
            "times of the machine named above.", ""]
    return out


for e in sorted(entries, key=lambda e: (e.principle, e.name.lower())):
    facts = [("Principle", e.principle + (f" (also {', '.join(e.also)})" if e.also else "")),
             ("Compresses", ", ".join(e.dimensions)), ("Training", e.training), ("Phase", e.phase),
             ("Granularity", e.granularity), ("Budget policy", e.budget_policy),
             ("Query-aware", "yes" if e.query_aware else "no"),
             ("Benchmark-seed family", e.benchmark_category or "—"), ("kvpress", e.kvpress or "—")]
    links = [f"[arXiv {e.arxiv}](https://arxiv.org/abs/{e.arxiv})" if e.arxiv else "",
             f"[DOI {e.doi}](https://doi.org/{e.doi})" if e.doi else "", f"[paper]({e.url})",
             f"[official code]({e.code})" if e.code else ""]
    lines = [f"# {e.name}", "", f"**{html.escape(e.title)}**  ", f"{', '.join(e.authors)} · {e.year}"
             + (f" · {e.venue}" if e.venue else ""), "", " · ".join(l for l in links if l), "",
             "| Axis | Value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts] + ["", "## Idea", "", e.summary, "",
             "## Key equation", "", f"$$\n{e.key_equation}\n$$", ""]
    if e.implementation:
        module = e.implementation.rsplit(".", 1)[0]
        nb = notebook_file[Path(e.notebook).stem]
        lines += ["## Reference implementation", "",
                  f"`{e.implementation}` — [API and source](../api/{module}.md), "
                  f"[notebook](../{nb}) (executed on the embedded model; its outputs are kept with the code).", "",
                  "```python", f"from {module} import {e.implementation.rsplit('.', 1)[1]}", "```", ""]
    elif e.architecture:
        lines += ["## Reference implementation", "", "Not a cache method: this entry changes the model, and its "
                  "module is in the next section.", ""]
    else:
        lines += ["## Reference implementation", "", "Not implemented in kvatlas yet "
                  "([contribute one](../contributing.md)).", ""]
    if e.architecture:
        lines += leaderboard.arch_entry_section(e.architecture, notebook_file[Path(e.notebook).stem], arch_rows)
    lines += ["## Results", ""]
    if e.reported_results:
        lines += ["### Reported by the paper", "",
                  "| Model | Benchmark | Metric | Setting | Value | Full cache | Source |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r.model} | {r.benchmark} | {r.metric} | {r.compression} | {r.value} | "
                  f"{'' if r.baseline_value is None else r.baseline_value} | {r.source} |" for r in e.reported_results]
        lines += ["", "The paper's own numbers, under its own models, data and hardware; units are the metric's "
                  "(as named in the Metric column). Not comparable across entries.", ""]
    else:
        lines += ["### Reported by the paper", "", e.no_results_reason or "No results recorded from the paper yet.", ""]
    lines += measured_section(e)
    if e.builds_on or e.compared_with:
        lines += ["## Related", ""]
        if e.builds_on:
            lines.append("Builds on: " + ", ".join(link(i) for i in e.builds_on) + "  ")
        if e.compared_with:
            lines.append("Compared with: " + ", ".join(link(i) for i in e.compared_with))
        lines.append("")
    lines += [f"[Compare {html.escape(e.name)} with other methods](../compare.md?m={e.id})", ""]
    lines += ["## Cite this entry", "",
              f"Stable address of this page: `taxonomy/{e.id}/` (the entry's id, `{e.id}`, never changes). "
              "The paper's BibTeX:", "", "```bibtex", e.bibtex.strip(), "```", "",
              f"<small>Source of this page: `taxonomy/{e.id}.yaml` · `kvatlas cite {e.id}` · "
              "all entries: [atlas.bib](../atlas.bib)</small>", ""]
    write(f"taxonomy/{e.id}.md", "\n".join(lines), edit=f"taxonomy/{e.id}.yaml")
    nav["Taxonomy", e.principle, e.name] = f"taxonomy/{e.id}.md"

# ---------------------------------------------------------------------------------------------------- families
def best_measured(members) -> list[str]:
    """Per setting and target ratio, the member with the highest passkey accuracy (ties: the smaller cache)."""
    rows = [(e, r) for e in members for r in measured.get(e.id, [])]
    if not rows:
        return ["No member of this family has been measured by the atlas yet.", ""]
    out = ["From the legacy passkey runs; ratios in the **fp32 unit** (a quantizer's is about twice its 16-bit "
           "ratio on the [leaderboard](../leaderboard.md)).", "",
           "| Setting | Target ratio (×) | Best method | Passkey accuracy (fraction) | Achieved ratio (×, fp32 unit) |",
           "|---|---|---|---|---|"]
    for setting, target in sorted({(r["setting"], r["target_ratio"]) for _, r in rows}):
        cands = [(e, r) for e, r in rows if r["setting"] == setting and r["target_ratio"] == target]
        e, r = max(cands, key=lambda c: (c[1]["accuracy"], c[1]["achieved_ratio"]))
        out.append(f"| {setting} | {target:g} | {link(e.id, '../taxonomy/')} | {r['accuracy']:.2f} | "
                   f"{r['achieved_ratio']:.2f} |")
    return out + ["", "Same setup for every method: see the [per-method evidence](../evidence.md).", ""]


for p, definition in VOCAB["principle"].items():
    primary = [e for e in entries if e.principle == p]
    if not primary:
        continue
    also = [e for e in entries if p in e.also]
    implemented = [e for e in primary + also if e.implementation]
    dims = Counter(d for e in primary for d in e.dimensions)
    train = Counter(e.training for e in primary)
    fam = [f"# {p}", "", definition, "",
           f"{len(primary)} entries file this as their principle" + (f", {len(also)} more use it too" if also else "")
           + f"; {len(implemented)} have a reference implementation in kvatlas. They compress "
           + ", ".join(f"{d} ({n})" for d, n in dims.most_common()) + "; training: "
           + ", ".join(f"{t} ({n})" for t, n in train.most_common()) + ".", "",
           "## Implemented", "",
           (", ".join(f"{link(e.id, '../taxonomy/')} ([notebook](../{notebook_file[Path(e.notebook).stem]}))"
                      for e in implemented) or "None yet ([contribute one](../contributing.md))."), "",
           "## Best measured result", ""] + best_measured(implemented) + [
           "## Lineage", "", "Who builds on whom (solid) and compares with whom (dashed), by year; greyed: ancestors "
           "from other families.", "",
           # raw HTML inside the page at families/<p>/: an entry page is ../../taxonomy/<id>/
           f'<div style="overflow-x:auto">{lineage_svg(entries, p, href=lambda eid: f"../../taxonomy/{eid}/")}</div>',
           "",
           "## Entries", "", "| Method | Year | Venue | Compresses | Training | Implemented |", "|---|---|---|---|---|---|"]
    fam += [f"| {link(e.id, '../taxonomy/')} | {e.year} | {html.escape(e.venue or '')} | {', '.join(e.dimensions)} | "
            f"{e.training} | {'yes' if e.implementation else 'no'} |" for e in sorted(primary, key=lambda e: (e.year, e.name))]
    if also:
        fam += ["", "Also using this principle: " + ", ".join(link(e.id, "../taxonomy/") for e in also)]
    write(f"families/{p}.md", "\n".join(fam) + "\n")
    nav["Taxonomy", p] = f"families/{p}.md"

# ---------------------------------------------------------------------------------------------------- compare
compare_data = {e.id: {"name": e.name, "title": e.title, "year": e.year, "venue": e.venue or "",
                       "principle": e.principle, "dimensions": e.dimensions, "training": e.training,
                       "phase": e.phase, "granularity": e.granularity, "budget_policy": e.budget_policy,
                       "query_aware": e.query_aware, "implemented": bool(e.implementation),
                       "equation": e.key_equation, "reported": len(e.reported_results),
                       "measured": {f"{r['setting']} {r['target_ratio']:g}x": [round(r["accuracy"], 2),
                                                                               round(r["achieved_ratio"], 2)]
                                    for r in measured.get(e.id, [])}}
                for e in sorted(entries, key=lambda e: e.name.lower())}
write("compare.md", f"""# Compare methods

Pick two to four methods: their axes, key equations and this atlas's measurements side by side. The address
keeps the choice (`compare/?m=snapkv,h2o`), so a comparison can be linked. Measured cells read
"passkey accuracy (fraction of prompts) @ achieved ratio (×, fp32 unit)", from the legacy
[per-method evidence](evidence.md) runs, whose ratios are against an fp32 full cache (a quantizer's is about twice
its ratio in the [leaderboard](leaderboard.md)'s 16-bit unit).

<div id="kv-compare" markdown="0"></div>
<script type="application/json" id="kv-compare-data">{html.escape(json.dumps(compare_data), quote=False)}</script>
""")
nav["Compare"] = "compare.md"

# ---------------------------------------------------------------------------------------------------- downloads
from reference_impls.atlas.export import to_bibtex, to_csv, to_json  # noqa: E402

downloads = {"atlas.json": to_json(entries), "atlas.csv": to_csv(entries), "atlas.bib": to_bibtex(entries)}
for _name, _text in downloads.items():
    write(_name, _text)


# ---------------------------------------------------------------------------------------------------- vocabulary
voc = ["# Vocabulary", "", "Every controlled value of the taxonomy, defined. Source: `taxonomy/vocabulary.yaml`; "
       "the schema (`taxonomy/schema.json`) enforces it.", ""]
for field, values in VOCAB.items():
    voc += [f"## `{field}`", "", "| Value | Definition | Entries |", "|---|---|---|"]
    for v, d in values.items():
        n = sum(1 for e in entries if v in ([e.principle, *e.also] if field == "principle" else
                                           e.dimensions if field == "dimensions" else [getattr(e, field, None)]))
        voc.append(f"| `{v}` | {d} | {n} |")
    voc.append("")
write("taxonomy/vocabulary.md", "\n".join(voc))
nav["Vocabulary"] = "taxonomy/vocabulary.md"

# ---------------------------------------------------------------------------------------------------- seeds
cat_rows = []
for cat, definition in VOCAB["benchmark_category"].items():
    mine = [e for e in entries if e.benchmark_category == cat]
    principles = sorted({e.principle for e in mine})
    cat_rows.append(f"| {cat} | {', '.join(principles) or '—'} | {', '.join(link(e.id, 'taxonomy/') for e in mine) or '—'} |")
matrix_rows = []
for p in VOCAB["principle"]:
    c = Counter(d for e in entries if e.principle == p for d in e.dimensions)
    t = Counter(e.training for e in entries if e.principle == p)
    matrix_rows.append(f"| {p} | " + " | ".join(str(c.get(d, "")) for d in VOCAB["dimensions"]) + " | "
                       + ", ".join(f"{k} {v}" for k, v in t.most_common()) + " |")
write("seeds.md", f"""# How the two seed papers' taxonomies relate

kvatlas starts from two papers.

* **The survey** — Javidnia, Rouhani, Koushanfar, *Key, Value, Compress: A Systematic Exploration of KV Cache
  Compression Techniques*, arXiv 2503.11816 — files methods by **principle** (how: quantize, evict, merge,
  project, share, change the architecture, compress the prompt, offload) and by the **dimension** of the
  cache they shrink, with the **training** each needs. The atlas adopts these three axes as its schema.
* **The benchmark** — Yuan et al., *KV Cache Compression, But What Must We Give in Return?*, arXiv 2407.01527
  (EMNLP Findings 2024) — groups the methods it runs into five families by *where* the saving comes from:
  KV-cache quantization, token dropping, prompt compression, linear-time sequence models and hybrids.

The benchmark's families are coarser and cut across the survey's axes: "token dropping" spans the survey's
token eviction, budget allocation and retrieval/offload (InfLLM keeps blocks it can retrieve); "linear-time"
and "hybrid" are both architectures with a constant-size state, which the atlas files as `linear-hybrid`.
Each entry carries both labels (`principle` and `benchmark_category`), so the mapping below is computed from
the data, not asserted.

## Benchmark family → atlas principles

| Benchmark family | Atlas principles of its methods | Methods in the atlas |
|---|---|---|
{chr(10).join(cat_rows)}

## Principle × dimension (entry counts) and training needed

| Principle | {' | '.join(VOCAB['dimensions'])} | Training |
|---|{'---|' * len(VOCAB['dimensions'])}---|
{chr(10).join(matrix_rows)}

## What neither seed does, and the atlas adds

Neither seed measures memory, latency and throughput of every method under one harness; the benchmark's
ratios are nominal configuration values. The atlas's [leaderboard](leaderboard.md) runs every implemented
method on the same model, prompts, batch and machine, and reports the ratio **achieved** from the bytes the
cache actually holds, next to the target.
""")
nav["The two seeds"] = "seeds.md"

# ---------------------------------------------------------------------------------------------------- leaderboard
# The benchmark (`kvatlas bench`, 16-bit unit) from KVATLAS_BENCH_RESULTS (default results/bench; the tests and
# layout builds point it at tests/fixtures/bench); the findings checked on it; the legacy passkey runs (fp32 unit).
write("leaderboard.md", leaderboard.leaderboard_page(bench_rows, names, BENCH_REL, quick_rows, passkey_rows, arch_rows,
                                                    arch_links))
nav["Leaderboard"] = "leaderboard.md"
from reference_impls.bench.tasks import TASKS  # noqa: E402

write("benchmark.md", leaderboard.howto_page(TASKS, bench_rows))
nav["Running the benchmark"] = "benchmark.md"
write("findings.md", findings.findings_page(bench_rows, {e.id: e.phase for e in entries}))
nav["Findings"] = "findings.md"
write("evidence.md", leaderboard.legacy_page(summary_rows, configs))
nav["Per-method evidence (legacy)"] = "evidence.md"

# ---------------------------------------------------------------------------------------------------- notebooks
def notebook_page(name: str, page: str) -> str:
    """The notebook as the site shows it, with a note under its title on where its outputs come from."""
    if page.endswith(".py"):  # quick build, stale or missing executed copy: the source, without outputs
        text = execute_notebooks.source_of(name).read_text(encoding="utf-8")
        note = ("# %% [markdown]\n# **Shown without outputs.** This layout build shows the notebook's source only: "
                "its executed copy is stale or missing (`make notebooks`).\n\n")
        head, sep, rest = text.partition("\n# %%")  # after the jupytext header, before the first cell
        first, sep2, others = rest.partition("\n# %%")
        return head + sep + first + "\n" + note + sep2.lstrip("\n") + others if sep2 else text
    nb = json.loads(execute_notebooks.executed_of(name).read_text(encoding="utf-8"))
    meta = nb["metadata"]["kvatlas"]
    note = (f"<small>Outputs as executed by `make notebooks` on the embedded model, checked in with the code "
            f"(`notebooks/executed/{name}.ipynb`). They are up to date with `{meta['source']}` and the "
            f"{len(meta['inputs'])} files it read: " + ", ".join(f"`{i}`" for i in meta["inputs"]) + ".</small>")
    nb["cells"].insert(1, {"cell_type": "markdown", "id": "kvatlas-provenance", "metadata": {}, "source": note})
    return json.dumps(nb, indent=1, ensure_ascii=False)


for name, page in notebook_file.items():
    write(page, notebook_page(name, page), edit=f"notebooks/{name}.py")
    nav["Notebooks", name] = page

# ---------------------------------------------------------------------------------------------------- API
import reference_impls  # noqa: E402

for mod in sorted(pkgutil.walk_packages(reference_impls.__path__, "reference_impls."), key=lambda m: m.name):
    if mod.ispkg or mod.name.endswith(".cli") or mod.name.startswith("reference_impls.atlas.paths"):
        continue
    write(f"api/{mod.name}.md", f"# `{mod.name}`\n\n::: {mod.name}\n")
    nav["API reference", *mod.name.split(".")[1:]] = f"api/{mod.name}.md"

# ---------------------------------------------------------------------------------------------------- contributing
write("contributing.md", (ROOT / "CONTRIBUTING.md").read_text() if (ROOT / "CONTRIBUTING.md").exists() else "")
nav["Contributing"] = "contributing.md"

# ---------------------------------------------------------------------------------------------------- manifest
# Every page the site must have: the entries plus the fixed pages (scripts/check_site.py compares).
with mkdocs_gen_files.open("pages.json", "w") as f:
    json.dump({"entries": len(entries), "pages": sorted(pages)}, f, indent=1)

with mkdocs_gen_files.open("nav.txt", "w") as f:
    f.write("* [Home](index.md)\n")
    f.writelines(nav.build_literate_nav())
