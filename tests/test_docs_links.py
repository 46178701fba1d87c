"""The documentation's relative links resolve, and README.md stays a short front door.

For README.md, docs/*.md and benchmarks/*.md: every relative markdown link `[text](path)` or
`[text](path#anchor)` (images included) names an existing file, and every anchor names a heading of
its target (GitHub's slugs). Reads text only: no model, no network.
"""
import glob
import os
import re
import unicodedata

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_WORDS = 2500

# [text](target) or ![alt](target); the target stops at whitespace or ')' (an optional "title" after
# a space is ignored). Code spans and fenced blocks are removed before matching.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def pages():
    found = [os.path.join(REPO, "README.md")]
    found += sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
    found += sorted(glob.glob(os.path.join(REPO, "benchmarks", "*.md")))
    return found


def prose_lines(text):
    """(line number, line) outside fenced code blocks, with inline code spans blanked."""
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield number, re.sub(r"(`+)(?:(?!\1).)+\1", "", line)


def slug(heading):
    """GitHub's anchor for a heading: markup removed, lowercase, punctuation dropped except
    hyphens (and underscores, which GitHub keeps as word characters), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # links keep their text
    text = text.replace("`", "").lower()
    kept = []
    for ch in text:
        category = unicodedata.category(ch)
        if ch in "-_ " or category[0] in "LN" or category == "Mn":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(path):
    """Every heading anchor of a markdown file, with GitHub's -1, -2, ... for repeats."""
    seen, result = {}, set()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    inside = False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        match = None if inside else HEADING.match(line)
        if match:
            base = slug(match.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            result.add(base if n == 0 else f"{base}-{n}")
    return result


def links_of_text(text):
    """(line number, target) of every markdown link outside code."""
    for number, line in prose_lines(text):
        for target in LINK.findall(line):
            yield number, target


def links(path):
    with open(path, encoding="utf-8") as f:
        return list(links_of_text(f.read()))


def is_relative(target):
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith("//")


def test_slug_follows_github_rules():
    assert slug("KV-cache modes (`--cache`)") == "kv-cache-modes---cache"
    assert slug("2026-12-01: three seeds on tiny-math") == "2026-12-01-three-seeds-on-tiny-math"
    assert slug("Names to import from `custom_demask_eval`") == "names-to-import-from-custom_demask_eval"
    assert slug("10.5 Diversity and repetition") == "105-diversity-and-repetition"
    assert slug("The README's worked example") == "the-readmes-worked-example"


def test_link_pattern_finds_links_and_skips_code():
    line = "see [a](docs/a.md#x), ![img](b.png) and `[c](not-a-link.md)`"
    assert [t for _, t in links_of_text(line)] == ["docs/a.md#x", "b.png"]


def test_there_are_pages_and_links():
    found = pages()
    names = {os.path.relpath(p, REPO) for p in found}
    assert "README.md" in names and "docs/protocol.md" in names
    assert sum(1 for p in found for _ in links(p)) > 50


@pytest.mark.parametrize("page", pages(), ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve(page):
    problems = []
    for number, target in links(page):
        if not is_relative(target):
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(resolved):
            problems.append(f"line {number}: {target}: no file {os.path.relpath(resolved, REPO)}")
            continue
        if anchor:
            if not resolved.endswith(".md"):
                problems.append(f"line {number}: {target}: anchor into a file that is not markdown")
            elif anchor not in anchors(resolved):
                problems.append(f"line {number}: {target}: no heading #{anchor} in "
                                f"{os.path.relpath(resolved, REPO)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", pages(), ids=lambda p: os.path.relpath(p, REPO))
def test_no_links_to_python_files(page):
    """Code is referred to by code spans, not links: the package's files move."""
    bad = [f"line {n}: {t}" for n, t in links(page) if is_relative(t) and t.partition("#")[0].endswith(".py")]
    assert not bad, "\n".join(bad)


def test_readme_is_short():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        words = len(f.read().split())
    assert words <= README_MAX_WORDS, f"README.md has {words} words (at most {README_MAX_WORDS})"


def test_readme_links_every_docs_page():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    targets = {t.partition("#")[0] for _, t in links_of_text(text)}
    missing = [os.path.relpath(p, REPO) for p in sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
               if os.path.relpath(p, REPO) not in targets]
    assert not missing, f"README.md does not link {missing}"
