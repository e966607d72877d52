"""Check that every relative link and image in README.md and docs/**/*.md resolves.

    python tools/check_doc_links.py        # prints each broken link; exit 1 if there is one

A link's file must exist (relative to the page that holds it); a `#fragment` into a markdown file must
match one of its headings under GitHub's slug rule. Links with a scheme (https:, mailto:) are skipped,
and so are links inside code blocks and inline code.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def strip_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    s = re.sub(r"`|\*\*?|_(?=\w)|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", md.read_text(), flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M)}


def main() -> int:
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    bad = 0
    for page in pages:
        for target in LINK.findall(strip_code(page.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue
            path, _, frag = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)}: {target}"
            if not dest.exists():
                print(f"missing: {where}")
                bad += 1
            elif frag and dest.suffix == ".md" and frag not in anchors(dest):
                print(f"no heading #{frag}: {where}")
                bad += 1
    print(f"{len(pages)} pages checked, {bad} broken link(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
