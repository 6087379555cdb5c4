"""Markdown helpers for the docs tests: code blocks, command lines, links and GitHub anchors."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def doc_files() -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def split_fences(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    """(prose lines, fenced blocks): prose as (line number, line); blocks as (first line, info, body)."""
    prose, blocks = [], []
    fence, info, start, body = None, "", 0, []
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*(```+|~~~+)(.*)$", line)
        if fence is None and m:
            fence, info, start, body = m.group(1), m.group(2).strip(), n + 1, []
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            blocks.append((start, info, "\n".join(body)))
            fence = None
        elif fence is not None:
            body.append(line)
        else:
            prose.append((n, line))
    return prose, blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup stripped, lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    out = []
    for ch in text:
        if ch in " -":
            out.append("-")
        elif ch == "_" or unicodedata.category(ch)[0] in "LN":
            out.append(ch)
    return "".join(out)


def anchors(path: Path) -> set[str]:
    """Every anchor a page has: heading slugs (duplicates numbered -1, -2, ... as GitHub does)."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        k = seen.get(slug, 0)
        found.add(slug if k == 0 else f"{slug}-{k}")
        seen[slug] = k + 1
    return found


LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline Markdown link outside code (fences and `spans`)."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    out = []
    for n, line in prose:
        line = re.sub(r"`[^`]*`", "", line)
        out += [(n, m.group(1)) for m in LINK.finditer(line)]
    return out


def broken_links(path: Path) -> list[str]:
    """Relative links of one page whose file, folder or #anchor does not exist."""
    bad = []
    for n, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(REPO)}:{n}: {target}"
        if not dest.exists():
            bad.append(f"{where} (no such file)")
        elif anchor and (dest.is_dir() or dest.suffix != ".md"):
            bad.append(f"{where} (anchor into a non-Markdown target)")
        elif anchor and anchor not in anchors(dest):
            bad.append(f"{where} (no heading with this anchor in {dest.relative_to(REPO)})")
    return bad


# -- command lines ------------------------------------------------------------------------------

COMMAND = re.compile(r"python\s+(?:train\.py|test\.py|predict\.py|-m\s+iad_lightning\.[\w.]+)")
SKIP_MARKER = "docs-test: skip"  # on a command's line (a # comment) or in an HTML comment right above its block
DATE = "2026-01-01_00-00-00"     # what a `<date>` run-folder placeholder stands for


def _logical_lines(body: str, first: int) -> list[tuple[int, str]]:
    """Lines of a code block with `\\` continuations joined, each with its first line number."""
    out, buf, start = [], "", first
    for n, line in enumerate(body.splitlines(), first):
        if not buf:
            start = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((start, buf + line))
        buf = ""
    if buf:
        out.append((start, buf))
    return out


def commands(path: Path) -> list[tuple[int, str, bool]]:
    """(line, command text from `python` on, skipped) for every documented command of a page:
    fenced shell blocks line by line (continuations joined) and inline code spans (which may wrap)."""
    text = path.read_text(encoding="utf-8")
    prose, blocks = split_fences(text)
    lines = text.splitlines()
    found = []
    for start, info, body in blocks:
        if info and info.split()[0] not in ("bash", "sh", "shell", "console", "text"):
            continue
        block_skip = start >= 3 and SKIP_MARKER in lines[start - 3]  # <!-- ... --> above the fence
        for n, line in _logical_lines(body, start):
            m = COMMAND.search(line)
            if m:
                found.append((n, line[m.start():], block_skip or SKIP_MARKER in line))
    # inline spans: join each paragraph so that spans wrapped over two lines are read whole
    para: list[tuple[int, str]] = []
    for n, line in prose + [(10**9, "")]:
        if line.strip():
            para.append((n, line.strip()))
            continue
        joined, starts = "", []
        for ln, l in para:
            starts.append((len(joined), ln))
            joined += l + " "
        for m in re.finditer(r"`([^`]+)`", joined):
            if COMMAND.match(m.group(1)) and COMMAND.sub("", m.group(1), 1).strip():  # `python train.py` alone names the program
                line_no = max(ln for off, ln in starts if off <= m.start())
                found.append((line_no, m.group(1), SKIP_MARKER in joined))
        para = []
    return sorted(found)
