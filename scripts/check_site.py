"""Check the built site: it works offline, its internal links resolve, and it has exactly the pages it should.

    python scripts/check_site.py site

1. Offline: no page loads a script, stylesheet, font or image from another host. Links to papers and code
   are fine (the reader follows them); resources a page loads by itself are not. A module that imports a
   CDN only when a notebook contains a mermaid diagram (mkdocs-jupyter) is allowed while no page has one.
2. Links: every relative href/src of every page resolves to a file of the site, and its #fragment, if
   any, to an id on the target page.
3. Pages: the built pages are exactly those gen_pages.py listed in pages.json (the entries plus the fixed
   pages), plus 404.html.
"""

import html
import json
import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

LOADS = [
    re.compile(r"<script[^>]*\bsrc=[\"'](https?:)?//(?!127\.0\.0\.1|localhost)[^\"']+", re.I),
    re.compile(r"<link[^>]*\brel=[\"'](stylesheet|preconnect|preload|icon|modulepreload)[\"'][^>]*\bhref=[\"'](https?:)?//(?!127\.0\.0\.1|localhost)[^\"']+", re.I),
    re.compile(r"<link[^>]*\bhref=[\"'](https?:)?//(?!127\.0\.0\.1|localhost)[^\"']+[\"'][^>]*\brel=[\"'](stylesheet|preconnect|preload|icon)[\"']", re.I),
    re.compile(r"<img[^>]*\bsrc=[\"'](https?:)?//(?!127\.0\.0\.1|localhost)[^\"']+", re.I),
    re.compile(r"@import\s+url\([\"']?https?://", re.I),
]


HREF = re.compile(r"""<(?:a|link|script|img|source)\b[^>]*?\b(?:href|src)=["']([^"']+)["']""", re.I)
IDS = re.compile(r"""\bid=["']([^"']+)["']""")


def page_url(path: str) -> str:
    """docs path -> built HTML path (use_directory_urls): taxonomy/x.md -> taxonomy/x/index.html."""
    stem = re.sub(r"\.(md|ipynb|py)$", "", path)
    if stem == "index" or stem.endswith("/index"):
        return stem + ".html"
    return stem + "/index.html"


def check_links(root: Path, pages: list[Path]) -> list[str]:
    bad, ids = [], {}

    def ids_of(p: Path) -> set:
        if p not in ids:
            ids[p] = set(IDS.findall(p.read_text(encoding="utf-8", errors="replace"))) if p.suffix == ".html" else set()
        return ids[p]

    for page in pages:
        text = page.read_text(encoding="utf-8", errors="replace")
        for raw in HREF.findall(text):
            url = urlsplit(html.unescape(raw))
            if url.scheme or url.netloc or raw.startswith(("data:", "mailto:", "javascript:")):
                continue
            base = root if url.path.startswith("/") else page.parent  # 404.html links from the site's root
            target = page if not url.path else (base / unquote(url.path.lstrip("/"))).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                bad.append(f"{page.relative_to(root)}: broken link {raw}")
                continue
            elif url.fragment and target.suffix == ".html" and unquote(url.fragment) not in ids_of(target):
                bad.append(f"{page.relative_to(root)}: no #{url.fragment} on {target.relative_to(root)}")
    return bad


def check_pages(root: Path, pages: list[Path]) -> list[str]:
    manifest = root / "pages.json"
    if not manifest.is_file():
        return ["pages.json is missing: gen_pages.py writes it"]
    listed = json.loads(manifest.read_text())
    want = {page_url(p) for p in listed["pages"]} | {"404.html"}
    have = {str(p.relative_to(root)) for p in pages}
    bad = [f"missing page: {p}" for p in sorted(want - have)] + [f"unexpected page: {p}" for p in sorted(have - want)]
    fixed = len(want) - 1 - listed["entries"]
    print(f"check_site: {len(have)} pages = {listed['entries']} entries + {fixed} fixed pages + 404", file=sys.stderr)
    return bad


def main(site: str) -> int:
    root = Path(site)
    pages = list(root.rglob("*.html"))
    if not pages:
        print(f"check_site: no HTML under {root}", file=sys.stderr)
        return 1
    bad = []
    for page in pages:
        text = page.read_text(encoding="utf-8", errors="replace")
        for rx in LOADS:
            bad += [f"{page.relative_to(root)}: {m.group(0)[:160]}" for m in rx.finditer(text)]
        if re.search(r"class=[\"'][^\"']*\bjp-Mermaid\b", text):
            bad.append(f"{page.relative_to(root)}: a mermaid diagram would load mermaid from a CDN")
    for css in root.rglob("*.css"):
        for m in re.finditer(r"url\([\"']?(https?:)?//[^)]+\)", css.read_text(encoding="utf-8", errors="replace")):
            bad.append(f"{css.relative_to(root)}: {m.group(0)[:160]}")
    print(f"check_site: {len(pages)} pages, {len(bad)} external loads", file=sys.stderr)
    links = check_links(root, pages)
    print(f"check_site: {len(links)} broken internal links", file=sys.stderr)
    bad += links + check_pages(root, pages)
    for line in bad:
        print(line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "site"))
