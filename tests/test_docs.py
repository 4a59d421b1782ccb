"""The documentation points only at files in the repository, and speaks of the project only."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# [text](target) and ![alt](target); the target ends at the first space or closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# a path outside the repository that some copies of it were written next to (spelled in two
# pieces so that this file does not match itself)
OUTSIDE = ("shared" + "/docs", "../" + "shared")
# words about how the project was developed, which mean nothing to a reader of the repository
HISTORY = re.compile(r"\bissue\s+#?\d|\bsessions?\b|\bscratch (run|a/b|measurement)", re.I)


def documents() -> list[Path]:
    """README.md, docs/*.md and every other Markdown file the repository tracks."""
    files = {ROOT / "README.md", *ROOT.glob("docs/*.md")}
    return sorted(files | {ROOT / p for p in tracked() if p.endswith(".md")})


def tracked() -> list[str]:
    """Paths git tracks (an empty list outside a git checkout, e.g. an unpacked archive)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [p for p in out.decode().split("\0") if p]


def relative_links(text: str) -> list[str]:
    """Link targets that are paths (no URL scheme, not a bare #anchor), anchors stripped."""
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def test_link_pattern_finds_paths_and_skips_urls():
    text = ("see [a](docs/a.md#x), ![f](../imgs/f.png \"title\"), [u](https://x.org/a.md), "
            "[m](mailto:a@b.c) and [h](#top)")
    assert relative_links(text) == ["docs/a.md", "../imgs/f.png"]


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(doc: Path):
    assert doc.is_file(), f"{doc} is missing"
    broken = []
    for target in relative_links(doc.read_text(encoding="utf-8")):
        path = (doc.parent / target).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to paths not in the repository: {broken}"


@pytest.mark.parametrize("notebook", sorted(ROOT.glob("notebooks/*.ipynb")), ids=lambda p: p.name)
def test_notebook_links_resolve_inside_the_repository(notebook: Path):
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    paths = {t: (notebook.parent / t).resolve() for t in relative_links(text)}
    broken = [t for t, path in paths.items() if not path.is_relative_to(ROOT) or not path.exists()]
    assert not broken, f"{notebook.name} links to paths not in the repository: {broken}"


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_speak_of_the_project_only(doc: Path):
    found = [m.group(0) for m in HISTORY.finditer(doc.read_text(encoding="utf-8"))]
    assert not found, f"{doc.relative_to(ROOT)} speaks of how it was developed: {found}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 200, f"README.md has {lines} lines; the long story belongs in docs/"


def test_no_tracked_file_points_outside_the_repository():
    paths = tracked()
    if not paths:
        pytest.skip("not a git checkout: no list of tracked files")
    offending = []
    for path in paths:
        file = ROOT / path
        if not file.is_file():
            continue                                  # deleted in the working tree
        data = file.read_bytes()
        if b"\0" in data:
            continue                                  # binary: checkpoints, images
        text = data.decode("utf-8", errors="replace")
        offending += [f"{path}: {p}" for p in OUTSIDE if p in text]
    assert not offending, f"paths outside the repository are cited: {offending}"
