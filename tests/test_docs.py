"""The README and docs/: links stay inside the project, the synopsis and set-up match the tool."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from compressor import cli
from compressor.activations import STE_CHOICES
from compressor.method.penalties import INDIVIDUAL_PENALTIES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, ROOT / "docs" / "design.md", ROOT / "docs" / "math.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _section(text: str, heading: str) -> str:
    """The text under the ``## heading...`` line, up to the next ``## `` heading."""
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_point_to_files_and_headings_inside_the_project(doc):
    assert doc.is_file(), doc
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.is_relative_to(ROOT), f"{doc.name} links outside the project: {target}"
        assert file.exists(), f"{doc.name} links to a missing file: {target}"
        if anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
            assert anchor in {_anchor(h) for h in headings}, f"{doc.name}: no heading #{anchor}"


def test_readme_links_the_design_and_the_math():
    links = LINK.findall(README.read_text())
    assert "docs/design.md" in links and "docs/math.md" in links


def test_synopsis_brackets_every_option_the_parser_does_not_require():
    synopsis = _code_blocks(_section(README.read_text(), "Command line"))[0]
    usage = synopsis.split("compress --list-recipes")[0]
    bare = re.sub(r"\[[^\]]*\]", "", usage)  # what is left outside brackets is required
    required = {
        opt
        for action in cli.get_args_parser()._actions
        if action.required
        for opt in action.option_strings
    }
    assert set(re.findall(r"--[a-z-]+", bare)) == required
    assert "[--recipe NAME|PATH]" in usage


def test_quick_start_is_three_copy_pasteable_steps_that_the_parser_accepts():
    blocks = _code_blocks(_section(README.read_text(), "Quick start"))
    assert len(blocks) == 3  # install, run the example, run the tests
    for block in blocks:
        for line in block.strip().splitlines():
            assert not line.startswith(("$", ">", "#")), line  # no prompts to strip
            assert "<" not in line and "..." not in line, line  # no placeholders to fill
    (example,) = [b for b in blocks if b.startswith("compress ")]
    args = shlex.split(example)[1:]
    parsed = cli.get_args_parser().parse_args(args)
    assert (ROOT / parsed.checkpoint).is_file()
    assert (ROOT / parsed.data).is_file()


def test_math_covers_every_penalty_and_estimator_and_cites_the_papers():
    math = (ROOT / "docs" / "math.md").read_text()
    for kind in INDIVIDUAL_PENALTIES[1:]:  # "none" has no operator
        assert kind.upper().replace("-", " - ") in math or kind in math, kind
    for ste in STE_CHOICES:
        assert f"`{ste}`" in math, ste
    for cited in ("Dinh", "Bui", "Yin", "ICLR 2019", "Zhang & Xin", "Lou & Yan"):
        assert cited in math, cited


def test_design_lists_every_module():
    design = (ROOT / "docs" / "design.md").read_text()
    modules = sorted(p.name for p in (ROOT / "compressor").glob("*.py") if p.stem[0] != "_")
    missing = [m for m in modules if f"`{m}`" not in design]
    assert not missing, f"docs/design.md does not describe {missing}"
