"""Docs that cannot rot: every command line in README.md and docs/ composes, every relative link resolves.

Commands are `python train.py|test.py|predict.py ...` (composed in-process with Hydra's compose
API, the same as a dry `--cfg job`; sweeps are expanded: every value of a config-group sweep, the
first value of any other) and `python -m iad_lightning.<module> ...` (its own argument parsing).
Paths need not exist (`/datasets/...` is a placeholder); a `<date>` run folder stands for a fixed
date, any other `<placeholder>` for a word. A command that cannot be checked is marked on its line
with `# docs-test: skip` (or `<!-- docs-test: skip -->` right above its code block) and says why.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from tests.docs._doclinks import DATE, REPO, broken_links, commands, doc_files

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


def check_hydra(config_name: str, args: list[str]) -> None:
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    if flags := [a for a in overrides if a.startswith("-")]:
        raise ValueError(f"flags the docs test does not know: {flags}")
    for single in hydra_override_sets(overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            compose(config_name, overrides=single, return_hydra_config=True)


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


# -- the checker itself, on small made-up pages ------------------------------------------------

def test_extraction_joins_continuations_and_drops_comments(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text `python test.py\nckpt_path=x` end\n\n```bash\n# a comment\n"
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


def test_link_checker_catches_missing_files_and_anchors(tmp_path):
    (tmp_path / "b.md").write_text("# Title `with code`\n\n## Same\n\n## Same\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#title-with-code) [dup](b.md#same-1) [self](#local) [web](https://x.org/y)\n"
                    "# Local\n[gone](c.md) [bad](b.md#nope) `[not a link](zz.md)`\n")
    with mock.patch("tests.docs._doclinks.REPO", tmp_path):
        bad = broken_links(page)
    assert len(bad) == 2 and "c.md" in bad[0] and "#nope" in bad[1]
