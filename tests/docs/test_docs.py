"""Docs that cannot rot: every command line in README.md and docs/ composes, every relative link resolves.

Commands are `python train.py|test.py|predict.py ...` (composed in-process with Hydra's compose
API, the same as a dry `--cfg job`; sweeps are expanded: every value of a config-group sweep, the
first value of any other) and `python -m iad_lightning.<module> ...` (its own argument parsing).
Paths need not exist (`/datasets/...` is a placeholder); a `<date>` run folder stands for a fixed
date, any other `<placeholder>` for a word. A command that cannot be checked is marked on its line
with `# docs-test: skip` (or `<!-- docs-test: skip -->` right above its code block) and says why.
Option names quoted in the text (an inline `method.crop=null`) must be a key of some option of
their config group, and a group choice (`data=folder`) an existing file.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import shlex
import unicodedata
from pathlib import Path
from unittest import mock

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

# -- Markdown: code blocks, command lines, links and GitHub anchors -----------------------------

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


def paragraphs(path: Path) -> list[tuple[list[tuple[int, int]], str]]:
    """Prose paragraphs outside code fences, each joined into one line (a link or a code span may
    wrap), with (offset in the joined text, line number) of each of its lines."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    out, para = [], []
    for n, line in prose + [(10**9, "")]:
        if line.strip():
            para.append((n, line.strip()))
            continue
        joined, starts = "", []
        for ln, l in para:
            starts.append((len(joined), ln))
            joined += l + " "
        if para:
            out.append((starts, joined))
        para = []
    return out


def _line_at(starts: list[tuple[int, int]], offset: int) -> int:
    return max(ln for off, ln in starts if off <= offset)


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline Markdown link outside code (fences and `spans`)."""
    out = []
    for starts, text in paragraphs(path):
        text = re.sub(r"`[^`]*`", lambda m: " " * len(m.group(0)), text)  # same offsets, no code
        out += [(_line_at(starts, m.start()), m.group(1)) for m in LINK.finditer(text)]
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


def inline_spans(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every inline code span in prose; a span wrapped over two lines is read whole."""
    return [(_line_at(starts, m.start()), m.group(1).strip())
            for starts, text in paragraphs(path) for m in re.finditer(r"`([^`]+)`", text)]


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
            if m and not line.lstrip().startswith("#"):  # a shell comment may name a command
                found.append((n, line[m.start():], block_skip or SKIP_MARKER in line))
    for n, span in inline_spans(path):
        if COMMAND.match(span) and COMMAND.sub("", span, 1).strip():  # `python train.py` alone names the program
            found.append((n, span, SKIP_MARKER in span))
    return sorted(found)


# -- checking commands --------------------------------------------------------------------------

CONF = REPO / "conf"
SCRIPTS = {"train.py": "train", "test.py": "test", "predict.py": "predict"}
SHELL_OPS = {"&&", "||", ";", "|", ">", ">>", "2>", "&", "2>&1"}
PAGES = doc_files()


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO)) for p in paths]


def words_of(command: str) -> list[list[str]]:
    """Shell words of one documented command (up to a shell operator), one list per variant: an
    inline synopsis `key=a|b` gives one variant per alternative, an optional `[key=value]` is kept."""
    command = command.replace("<date>", DATE)
    command = re.sub(r"<[^<>]*>", "PLACEHOLDER", command)
    words = []
    for w in shlex.split(command, comments=True):
        if w in SHELL_OPS:
            break
        if w.startswith("[") and w.endswith("]") and "=" in w:
            w = w[1:-1]
        words.append(w)
    variants = [words]
    for i, w in enumerate(words):
        key, sep, value = w.partition("=")
        if sep and "|" in value and not value.startswith(("'", '"')):
            variants = [v[:i] + [f"{key}={alt}"] + v[i + 1:] for v in variants for alt in value.split("|")]
    return variants


def hydra_override_sets(overrides: list[str]) -> list[list[str]]:
    """The sweep expanded into single runs: every value of a config-group sweep (each may be a
    different file), the first value of a value sweep (the same keys)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    base, extra = [], []
    for o in parsed:
        key = o.get_key_element()
        if not o.is_sweep_override():
            base.append(f"{key}={o.get_value_element_as_str()}")
            continue
        values = list(o.sweep_string_iterator())
        base.append(f"{key}={values[0]}")
        if (CONF / o.key_or_group).is_dir():
            extra += [(len(base) - 1, f"{key}={v}") for v in values[1:]]
    sets = [base]
    for i, override in extra:
        sets.append(base[:i] + [override] + base[i + 1:])
    return sets


@functools.lru_cache(maxsize=None)  # the same command in several pages is composed once
def composed(config_name: str, overrides: tuple[str, ...] = ()) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=True)


def check_hydra(config_name: str, args: list[str]) -> None:
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    if flags := [a for a in overrides if a.startswith("-")]:
        raise ValueError(f"flags the docs test does not know: {flags}")
    for single in hydra_override_sets(overrides):
        composed(config_name, tuple(single))


def check_module(module: str, args: list[str]) -> None:
    if module == "iad_lightning.report":
        report = importlib.import_module(module)
        with mock.patch.object(report, "build_report", return_value=""), \
                mock.patch.object(report, "atomic_write"), mock.patch("builtins.print"):
            try:
                report.main(args)
            except SystemExit as err:  # argparse's way of saying the arguments are wrong
                raise ValueError(f"argument error (exit {err.code})") from None
        return
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"no module {module}")
    mod = importlib.import_module(module)
    if hasattr(mod, "parse_args"):  # iad_lightning.export: key=value options, no loading
        mod.parse_args(args)


def check_command(command: str) -> None:
    for words in words_of(command):
        if words[:2] == ["python", "-m"]:
            check_module(words[2], words[3:])
        elif len(words) > 1 and words[0] == "python" and words[1] in SCRIPTS:
            check_hydra(SCRIPTS[words[1]], words[2:])
        else:
            raise ValueError(f"not a command the docs test knows: {words[:3]}")


def failures(page: Path) -> list[str]:
    out = []
    for line, command, skipped in commands(page):
        if skipped:
            continue
        try:
            check_command(command)
        except Exception as err:  # every failure of every command, not only the first
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            out.append(f"{page.relative_to(REPO)}:{line}: {command}\n    -> {type(err).__name__}: {msg}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_documented_commands_compose(page):
    bad = failures(page)
    assert not bad, "commands that do not compose:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_relative_links_and_anchors_resolve(page):
    bad = broken_links(page)
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_docs_have_commands_and_links():
    """The extraction sees what is there (guards against a parser that silently finds nothing)."""
    readme = REPO / "README.md"
    assert any("train.py" in c for _, c, _ in commands(readme))
    assert sum(len(commands(p)) for p in PAGES) >= 50


def test_readme_stays_an_entrance():
    """The README is the way in (install, the main job, your own images, tables, pointers); the
    manual lives in docs/ (issue 22: at most ~250 lines)."""
    n = len((REPO / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 250, f"README.md has {n} lines: move the detail into a page under docs/"


@pytest.mark.parametrize("page", PAGES[1:], ids=_ids(PAGES[1:]))
def test_each_page_opens_with_what_a_reader_can_do(page):
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    paragraphs = [line for _, line in prose if line.strip()]
    assert paragraphs[0].startswith("# ") and paragraphs[1].startswith("What you can do with this page:"), \
        f"{page.relative_to(REPO)}: a title, then 'What you can do with this page: ...'"


# -- option names in prose: `method.crop=null` must still be a key of some config -----------------

OPTION = re.compile(r"^[a-z][\w]*(?:[./][a-z_][\w]*)*=\S*$")
ALTERNATIVES = {  # where a key of this group may live: every option of the group, composed lazily
    "method": "method", "data": "data", "eval_data": "eval_data", "trainer": "trainer", "logger": "logger",
    "hydra": "hydra/launcher", "backbone": "backbone",
}


def option_spans(path: Path) -> list[tuple[int, str]]:
    """(line, `key=value`) of inline code spans in prose that consist of Hydra overrides only."""
    out = []
    for n, span in inline_spans(path):
        words = span.split()
        if words and all(OPTION.match(w) for w in words):
            out += [(n, w) for w in words]
    return out


def has_key(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node


def option_problem(option: str) -> str | None:
    """Why a documented `key=value` names no config key or group option (None: it does)."""
    key, _, value = option.partition("=")
    top = key.split(".")[0].split("/")[0]
    base = [composed(name) for name in SCRIPTS.values()]
    if not (CONF / top).is_dir() and not any(top in cfg for cfg in base):
        return None  # not a config key (a Python argument, an option of another tool, a shorthand)
    if "/" in key or (CONF / key).is_dir():  # a group choice: data=folder, hydra/launcher=slurm
        if re.search(r"[<>|.]|^$", value) or value == "null":
            return None  # a placeholder, alternatives or nothing chosen
        return None if (CONF / key / f"{value}.yaml").is_file() else f"no config {key}/{value}.yaml"
    if any(has_key(cfg, key) for cfg in base):
        return None
    group = ALTERNATIVES.get(top)
    options = sorted(p.stem for p in (CONF / group).glob("*.yaml")) if group else []
    for opt in options:
        if has_key(composed("train", (f"{group}={opt}",)), key):
            return None
    return f"no config has the key {key}" + (f" (tried every {group} option)" if group else "")



@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_option_names_in_prose_exist(page):
    bad = [f"{page.relative_to(REPO)}:{n}: `{opt}`: {why}" for n, opt in option_spans(page)
           if (why := option_problem(opt))]
    assert not bad, "options in the text that no config has:\n" + "\n".join(bad)


# -- the checker itself, on small made-up pages ------------------------------------------------

def test_extraction_joins_continuations_and_drops_comments(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text `python test.py\nckpt_path=x` end\n\n```bash\n# a comment on python train.py\n"
                    "python train.py method=uniad \\\n    data=mvtec   # trailing comment\n"
                    "python train.py bad_key_xyz=1  # docs-test: skip\n```\n")
    found = commands(page)
    assert found[0] == (1, "python test.py ckpt_path=x", False)
    assert found[1][0] == 6 and words_of(found[1][1]) == [["python", "train.py", "method=uniad", "data=mvtec"]]
    assert found[2][2] is True  # skipped by its marker


def test_checker_catches_what_does_not_compose():
    check_command("python train.py -m method=patchcore,padim data=mvtec data.root=/datasets/mvtec data.category=a,b")
    check_command("python test.py ckpt_path=outputs/train/runs/<date>/checkpoints/last.ckpt")
    check_command("python -m iad_lightning.export ckpt_path=... format=onnx|torchscript [dynamic_batch=true]")
    check_command("python -m iad_lightning.report outputs/train/multiruns/<date>")
    for bad in ("python train.py method=no_such_method",
                "python train.py -m method=patchcore,no_such_method",
                "python train.py data.no_such_key=1",
                "python -m iad_lightning.export ckpt_path=x format=tflite",
                "python -m iad_lightning.report",
                "python predict.py ckpt_path=x input=y devcie=cpu"):
        with pytest.raises(Exception):
            check_command(bad)


def test_option_checker_knows_keys_of_any_group_option():
    for ok in ("method.n_features=100", "method.crop=null", "eval_data.root=/x", "data.center_crop=false",
               "hydra.launcher.partition=gpu", "logger.wandb.project=p", "hydra/launcher=slurm",
               "data=<format>", "weights_only=True"):  # the last two: a placeholder, not a config key
        assert option_problem(ok) is None, ok
    for bad in ("method.no_such_key=1", "eval_data.rooot=/x", "logger.wandb.projekt=p", "data=nosuch",
                "hydra/launcher=slurmm"):
        assert option_problem(bad), bad


def test_link_checker_catches_missing_files_and_anchors(tmp_path):
    (tmp_path / "b.md").write_text("# Title `with code`\n\n## Same\n\n## Same\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#title-with-code) [dup](b.md#same-1) [self](#local) [web](https://x.org/y)\n"
                    "# Local\n[gone](c.md) [bad](b.md#nope) `[not a link](zz.md)`\n")
    with mock.patch(f"{__name__}.REPO", tmp_path):
        bad = broken_links(page)
    assert len(bad) == 2 and "c.md" in bad[0] and "#nope" in bad[1]
