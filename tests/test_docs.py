"""The code of the README and of the site's pages (docs/), run as a reader would run it.

Every fenced ```python block of README.md and docs/**/*.md is a test: it is saved as
a file of its own and run with this Python in a fresh folder (as a reader who copies
it into ``example.py`` would), and must exit 0 within the time below. So a renamed
option, a changed default or a wrong claim shown by an ``assert`` breaks a test here,
not a reader's first try.

A block whose fence names a file, ```` ```python title="models.py" ```` (the site shows
the name above it), is not run itself: it is written under that name beside the next
block of its page that runs, for an example of two files (a module and the script that
imports it).

An HTML comment on the line just before the opening fence (invisible on the site and
on GitHub) changes that for its block:

* ``<!-- not run: WHY -->``: a fragment that is not a whole program (it names the
  reader's own functions, or a service around it); WHY is required;
* ``<!-- needs: ray -->``: runs only where Ray is installed (marked ``ray``, so it
  runs with the Ray tests, last); it starts a local Ray of its own.

Any other comment there is an error, so a misspelt marker cannot silently skip or
run a block. Blocks in other languages (bash, text, json...) are not run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from _env import HAVE_RAY, NO_RAY, REPO, with_repo, without_ray_settings

# A block must be quick: small inputs, short sleeps. (The first block of a run also
# starts the fork server, a few tenths of a second on a loaded machine.)
BLOCK_TIMEOUT = 60
RAY_BLOCK_TIMEOUT = 120

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
TITLE = re.compile(r'\btitle="(?P<title>[^"]+)"')
MARKER = re.compile(r"^\s*<!--\s*(?P<body>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int  # of the opening fence, from 1
    language: str
    marker: str | None  # the comment just before the fence, without <!-- -->
    code: str
    title: str | None = None  # a file's name, from title="..." in the fence
    files: tuple[Block, ...] = ()  # the titled blocks written beside this one

    @property
    def name(self) -> str:
        path = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        return f"{path}:{self.line}"


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def blocks_of(path: Path) -> list[Block]:
    """The fenced code blocks of ``path``, in order, with their markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        info = opening["info"].strip()
        language = info.split()[0].lower() if info else ""
        titled = TITLE.search(info)
        previous = next((line for line in reversed(lines[:i]) if line.strip()), "")
        marked = MARKER.match(previous)
        body: list[str] = []
        i += 1
        while i < len(lines):
            closing = FENCE.match(lines[i])
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        start = len(found)
        found.append(
            Block(
                path=path,
                line=i - len(body),
                language=language,
                marker=marked["body"] if marked else None,
                code="\n".join(body) + "\n",
                title=titled["title"] if titled else None,
            )
        )
        assert i < len(lines), f"{found[start].name}: the code block is never closed"
        i += 1
    return found


def python_blocks() -> list[Block]:
    """Every python block, each runnable one with the titled blocks just before it."""
    found: list[Block] = []
    for path in markdown_files():
        files: list[Block] = []
        for block in blocks_of(path):
            if block.language != "python":
                continue
            if block.title is not None:
                files.append(block)
            elif _safe_kind(block) != "skip":
                block = replace(block, files=tuple(files))
                files = []
            found.append(block)
    return found


def kind_of(block: Block) -> str:
    """``run``, ``ray``, ``skip`` or ``file`` (a titled block, written beside the next
    one that runs), from the block's fence and marker (an unknown marker fails)."""
    if block.title is not None:
        return "file"
    return kind_of_marker(block)


def kind_of_marker(block: Block) -> str:
    marker = block.marker
    if marker is None:
        return "run"
    if marker == "needs: ray":
        return "ray"
    if re.fullmatch(r"not run: \S.*", marker):
        return "skip"
    raise AssertionError(
        f"{block.name}: unknown marker <!-- {marker} --> before a python block "
        "(known: '<!-- not run: WHY -->', '<!-- needs: ray -->')"
    )


def _safe_kind(block: Block) -> str:
    try:
        return kind_of(block)
    except AssertionError:
        return "run"  # test_markers says why; run it so that it fails visibly too


BLOCKS = python_blocks()


def params() -> list[object]:
    out: list[object] = []
    for block in BLOCKS:
        kind = _safe_kind(block)
        if kind in ("skip", "file"):
            continue
        marks = [pytest.mark.ray, pytest.mark.skipif(not HAVE_RAY, reason=NO_RAY)]
        out.append(pytest.param(block, id=block.name, marks=marks if kind == "ray" else []))
    return out


def run_block(block: Block, folder: Path) -> subprocess.CompletedProcess[str]:
    for file in block.files:
        (folder / str(file.title)).write_text(file.code, encoding="utf-8")
    script = folder / "example.py"
    script.write_text(block.code, encoding="utf-8")
    ray = kind_of(block) == "ray"
    env = with_repo()
    if ray:  # a Ray of its own; no token written to the home folder for it
        env = without_ray_settings(RAY_AUTH_MODE="disabled", PYTHONPATH=env["PYTHONPATH"])
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=RAY_BLOCK_TIMEOUT if ray else BLOCK_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.timeout(RAY_BLOCK_TIMEOUT + 30)
@pytest.mark.parametrize("block", params())
def test_block_runs(block: Block, tmp_path: Path) -> None:
    done = run_block(block, tmp_path)
    assert done.returncode == 0, (
        f"{block.name} exited with {done.returncode}\n--- code ---\n{block.code}"
        f"--- stdout ---\n{done.stdout}--- stderr ---\n{done.stderr}"
    )


def test_markers_are_known_and_most_blocks_run() -> None:
    kinds = [kind_of(block) for block in BLOCKS]
    # The collector must see the pages' code: a parser that finds nothing passes nothing.
    assert kinds.count("run") >= 30, kinds
    files = {block.path.name for block in BLOCKS}
    assert {"README.md", "getting-started.md", "concepts.md"} <= files
    written = {file for block in BLOCKS for file in block.files}
    unused = [block.name for block in BLOCKS if block.title and block not in written]
    assert not unused, f"titled blocks that no runnable block after them uses: {unused}"


def test_a_marker_only_applies_to_the_block_right_after_it(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- not run: a fragment -->\n\n```python\nx(\n```\n\ntext\n\n"
        "```python\nprint(1)\n```\n\n"
        "    ```python\n    assert True\n    ```\n"
    )
    first, second, third = blocks_of(page)
    assert (first.marker, first.line, first.code) == ("not run: a fragment", 3, "x(\n")
    assert kind_of(first) == "skip" and kind_of(second) == "run"
    assert second.code == "print(1)\n" and third.code == "assert True\n"
    page.write_text('```python title="helper.py"\nX = 1\n```\n')
    assert kind_of(blocks_of(page)[0]) == "file" and blocks_of(page)[0].title == "helper.py"
    page.write_text("<!-- not-run -->\n```python\npass\n```\n")
    with pytest.raises(AssertionError, match="unknown marker"):
        kind_of(blocks_of(page)[0])


def test_a_failing_block_fails_its_test(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nfrom alloter_mp import ProcessAlloter\n\n"
        "ProcessAlloter(2, no_such_option=1)\n```\n"
    )
    done = run_block(blocks_of(page)[0], tmp_path)
    assert done.returncode != 0 and "no_such_option" in done.stderr


def test_a_titled_block_is_a_file_beside_the_next_block_that_runs(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        '```python title="helper.py"\nVALUE = 42\n```\n\n'
        "```python\nimport helper\n\nassert helper.VALUE == 42\n```\n"
    )
    folder = tmp_path / "run"
    folder.mkdir()
    helper, script = blocks_of(page)
    done = run_block(replace(script, files=(helper,)), folder)
    assert done.returncode == 0, done.stderr
    assert (folder / "helper.py").read_text() == "VALUE = 42\n"


def test_the_sites_code_fits_its_column() -> None:
    """The site shows code in a column of about 80 characters: a longer line hides its
    end behind a scroll bar (docs/ruff.toml formats the blocks to 79)."""
    long = [
        f"{block.name}+{n}"
        for block in BLOCKS
        if block.path.is_relative_to(REPO / "docs")
        for n, line in enumerate(block.code.splitlines(), 1)
        if len(line) > 80
    ]
    assert not long, f"code lines over 80 characters: {long}"


def test_the_reference_renders_every_public_name() -> None:
    import alloter_mp
    import alloter_mp.ray

    pages = "".join(p.read_text() for p in (REPO / "docs" / "reference").glob("*.md"))
    rendered = set(re.findall(r"^::: (\S+)$", pages, flags=re.M))
    public = {f"alloter_mp.{name}" for name in alloter_mp.__all__ if name != "__version__"}
    public |= {f"alloter_mp.ray.{name}" for name in alloter_mp.ray.__all__}
    assert not public - rendered, f"public names missing from docs/reference: {public - rendered}"


# The site's pages and the README's links to them (the site itself is built by CI).
LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)\s]+)\)")


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code are not links
    broken = []
    for target in LINK.findall(text):
        file = target.split("#", 1)[0]
        if file and not (path.parent / file).exists():
            broken.append(target)
    assert not broken, f"{path.name} links to missing files: {broken}"
