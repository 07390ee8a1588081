"""The lineage of a family as a static SVG: who builds on whom, laid out by year (pure Python, works offline).

Nodes are the entries whose `principle` is the family, plus the entries of other families that they build
on (greyed). Edges: `builds_on` as solid arrows from the earlier work to the one that builds on it;
`compared_with` as dashed lines between two nodes already drawn (a comparison with a method outside the
picture would add a node for every baseline table). Columns are years, left to right; inside a year, a
method that builds on another of the same year sits to its right, and a crowded year wraps into more
columns. Each node links to its entry page (`href(id)`, by default `../<id>/`, the entry page seen from a
sibling page under `taxonomy/`; see `scripts/gen_pages.py`). The SVG keeps its natural size (12 px labels,
`max-width:none` against themes that shrink images to the column): wrap it in a box that scrolls sideways.
"""

from __future__ import annotations

from html import escape
from typing import Callable, Iterable

from reference_impls.atlas.schema import Entry

__all__ = ["family_svg", "family_graph"]

W, H, GAP_X, GAP_Y, TOP, LEFT, MAX_ROWS, CHARS = 156, 26, 56, 10, 54, 14, 12, 22


def family_graph(entries: Iterable[Entry], principle: str) -> tuple[list[Entry], list[Entry], set, set]:
    """(members, ancestors from other families, builds_on edges (old, new), compared_with pairs (a, b))."""
    by_id = {e.id: e for e in entries}
    members = [e for e in by_id.values() if e.principle == principle]
    ids = {e.id for e in members}
    ancestors = [by_id[r] for r in sorted({r for e in members for r in e.builds_on if r in by_id and r not in ids})]
    shown = ids | {e.id for e in ancestors}
    builds = {(r, e.id) for e in members for r in e.builds_on if r in shown and r != e.id}
    compared = set()
    for e in members + ancestors:
        for r in e.compared_with:
            pair = tuple(sorted((e.id, r)))
            if r in shown and r != e.id and (r, e.id) not in builds and (e.id, r) not in builds:
                compared.add(pair)
    return members, ancestors, builds, compared


def _columns(nodes: list[Entry], builds: set) -> dict[str, tuple[int, int]]:
    """id -> (column, row): a year's nodes in layers by same-year builds_on depth, layers wrapped at MAX_ROWS."""
    year = {e.id: e.year for e in nodes}
    parents = {e.id: [a for a, b in builds if b == e.id] for e in nodes}
    depth: dict[str, int] = {}

    def d(i: str, seen: tuple = ()) -> int:  # longest chain of same-year ancestors (cycles cut)
        if i not in depth:
            same = [p for p in parents[i] if year[p] == year[i] and p not in seen]
            depth[i] = 1 + max((d(p, seen + (i,)) for p in same), default=-1)
        return depth[i]

    place: dict[str, tuple[int, int]] = {}
    col = 0
    for y in sorted(set(year.values())):
        layers: dict[int, list[Entry]] = {}
        for e in nodes:
            if e.year == y:
                layers.setdefault(d(e.id), []).append(e)
        for k in sorted(layers):
            # order by where the parents already sit (fewer crossings), then by name
            def key(e: Entry) -> tuple:
                rows = [place[p][1] for p in parents[e.id] if p in place]
                return (sum(rows) / len(rows) if rows else float("inf"), e.name.lower())

            layer = sorted(layers[k], key=key)
            for start in range(0, len(layer), MAX_ROWS):
                for row, e in enumerate(layer[start:start + MAX_ROWS]):
                    place[e.id] = (col, row)
                col += 1
    return place


def _label(name: str) -> str:
    return name if len(name) <= CHARS else name[:CHARS - 1].rstrip() + "…"


def family_svg(entries: Iterable[Entry], principle: str, *,
               href: Callable[[str], str] = lambda eid: f"../{eid}/", compared: bool = True) -> str:
    """The family's lineage as an SVG document (a string); "" when no entry has this principle."""
    members, ancestors, builds, pairs = family_graph(entries, principle)
    if not members:
        return ""
    nodes = members + ancestors
    grey = {e.id for e in ancestors}
    place = _columns(nodes, builds)
    n_cols = 1 + max(c for c, _ in place.values())
    n_rows = 1 + max(r for _, r in place.values())
    width = LEFT * 2 + n_cols * W + (n_cols - 1) * GAP_X
    height = TOP + n_rows * (H + GAP_Y) + 30
    x = lambda i: LEFT + place[i][0] * (W + GAP_X)
    y = lambda i: TOP + place[i][1] * (H + GAP_Y)
    uid = f"kv-arrow-{principle}"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" class="kv-lineage" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" style="max-width:none" role="img" aria-label="lineage of the {escape(principle)} family">',
           f'<defs><marker id="{uid}" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#5c6bc0"/></marker></defs>']
    # year headings over the first column of each year
    first_col: dict[int, int] = {}
    for e in nodes:
        first_col[e.year] = min(first_col.get(e.year, place[e.id][0]), place[e.id][0])
    for yr, c in sorted(first_col.items()):
        out.append(f'<text x="{LEFT + c * (W + GAP_X)}" y="20" class="kv-lin-year" font-size="13" '
                   f'font-weight="bold" fill="#555">{yr}</text>')
    # edges first, so that nodes cover their ends
    for a, b in sorted(builds):
        out.append(_edge(x(a), y(a), x(b), y(b), place[a][0] == place[b][0], a, b, "builds_on",
                         f'stroke="#5c6bc0" stroke-width="1.4" fill="none" marker-end="url(#{uid})"'))
    if compared:
        for a, b in sorted(pairs):
            if place[a][0] > place[b][0]:
                a, b = b, a
            out.append(_edge(x(a), y(a), x(b), y(b), place[a][0] == place[b][0], a, b, "compared_with",
                             'stroke="#9e9e9e" stroke-width="1" stroke-dasharray="4 3" fill="none"'))
    for e in sorted(nodes, key=lambda e: place[e.id]):
        cls, fill, stroke, ink = (("kv-lin-node kv-lin-ancestor", "#eeeeee", "#bdbdbd", "#757575") if e.id in grey
                                  else ("kv-lin-node", "#e8eaf6", "#3f51b5", "#1a237e"))
        tip = f"{e.name} ({e.year}, {e.principle})" + (" — another family" if e.id in grey else "")
        # xlink:href, not href: Material's instant navigation rewrites every [href], which an SVG <a> refuses
        out.append(f'<a xlink:href="{escape(href(e.id))}" class="{cls}" data-id="{escape(e.id)}">'
                   f'<title>{escape(tip)}</title>'
                   f'<rect x="{x(e.id)}" y="{y(e.id)}" width="{W}" height="{H}" rx="5" fill="{fill}" '
                   f'stroke="{stroke}"/>'
                   f'<text x="{x(e.id) + W / 2}" y="{y(e.id) + H / 2 + 4}" text-anchor="middle" font-size="12" '
                   f'fill="{ink}">{escape(_label(e.name))}</text></a>')
    ly = height - 12
    out.append(f'<g class="kv-lin-legend" font-size="11" fill="#555">'
               f'<line x1="{LEFT}" y1="{ly - 4}" x2="{LEFT + 30}" y2="{ly - 4}" stroke="#5c6bc0" stroke-width="1.4" '
               f'marker-end="url(#{uid})"/><text x="{LEFT + 36}" y="{ly}">builds on (earlier → later)</text>'
               f'<line x1="{LEFT + 200}" y1="{ly - 4}" x2="{LEFT + 230}" y2="{ly - 4}" stroke="#9e9e9e" '
               f'stroke-dasharray="4 3"/><text x="{LEFT + 236}" y="{ly}">compared with</text>'
               f'<rect x="{LEFT + 340}" y="{ly - 10}" width="22" height="12" rx="3" fill="#eeeeee" stroke="#bdbdbd"/>'
               f'<text x="{LEFT + 368}" y="{ly}">another family</text></g>')
    out.append("</svg>")
    return "".join(out)


def _edge(x1: float, y1: float, x2: float, y2: float, same_col: bool, a: str, b: str, kind: str, style: str) -> str:
    """A curve from node a to node b: right side to left side, or around the right when in one column."""
    if same_col:
        sx, sy, ex, ey = x1 + W, y1 + H / 2, x2 + W, y2 + H / 2
        bend = 28 + abs(ey - sy) / 6
        d = f"M{sx},{sy} C{sx + bend},{sy} {ex + bend},{ey} {ex},{ey}"
    elif x2 < x1:  # pointing back in time (an entry dated before the work it builds on): left side to right side
        sx, sy, ex, ey = x1, y1 + H / 2, x2 + W, y2 + H / 2
        d = f"M{sx},{sy} C{sx - GAP_X * 0.8},{sy} {ex + GAP_X * 0.6},{ey} {ex},{ey}"
    else:
        sx, sy, ex, ey = x1 + W, y1 + H / 2, x2, y2 + H / 2
        mid = (sx + ex) / 2 if ex - sx < 2 * GAP_X else sx + GAP_X * 0.8
        d = f"M{sx},{sy} C{mid},{sy} {ex - GAP_X * 0.6},{ey} {ex},{ey}"
    return f'<path class="kv-lin-{kind.replace("_", "-")}" data-from="{escape(a)}" data-to="{escape(b)}" d="{d}" {style}/>'
