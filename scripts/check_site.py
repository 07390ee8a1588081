"""Check the built site works offline: no page loads a script, stylesheet, font or image from another host.

    python scripts/check_site.py site

Links to papers and code are fine (the reader follows them); resources a page loads by itself are not.
A module that imports a CDN only when a notebook contains a mermaid diagram (mkdocs-jupyter) is allowed
while no page has such a diagram.
"""

import re
import sys
from pathlib import Path

LOADS = [
    re.compile(r"<script[^>]*\bsrc=[\"'](https?:)?//(?!127\.0\.0\.1|localhost)[^\"']+", re.I),
    re.compile(r"<link[^>]*\brel=[\"'](stylesheet|preconnect|preload|icon|modulepreload)[\"'][^>]*\bhref=[\"'](https?:)?//(?!127\.0\.0\.1|localhost)[^\"']+", re.I),
    re.compile(r"<link[^>]*\bhref=[\"'](https?:)?//(?!127\.0\.0\.1|localhost)[^\"']+[\"'][^>]*\brel=[\"'](stylesheet|preconnect|preload|icon)[\"']", re.I),
    re.compile(r"<img[^>]*\bsrc=[\"'](https?:)?//(?!127\.0\.0\.1|localhost)[^\"']+", re.I),
    re.compile(r"@import\s+url\([\"']?https?://", re.I),
]


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
    for line in bad:
        print(line)
    print(f"check_site: {len(pages)} pages, {len(bad)} external loads", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "site"))
