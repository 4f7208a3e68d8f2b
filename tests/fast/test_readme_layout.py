"""The README's Layout section is the package tree: every folder and module under subpeft/ is listed
there, at its place, and everything listed exists (as the method table is checked against the registry).

The section's code block, between ``<!-- layout:begin -->`` and ``<!-- layout:end -->``, is a tree: a
line starts with one or more names (``folder/`` or ``module.py``, separated by single spaces), then two
or more spaces and a description. A line indented deeper than a folder's line lies in that folder; a
line whose first words are not names continues the description above. ``__init__.py`` files are not
listed (their folder is).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- layout:begin -->", "<!-- layout:end -->"


def layout_entries(text: str) -> list[str]:
    """The paths the Layout tree lists (folders end with '/'), in order."""
    assert BEGIN in text and END in text, "README.md lost its Layout markers"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    lines = [line.rstrip() for line in block.splitlines()]
    lines = [line for line in lines if line.strip() and not line.lstrip().startswith("```")]
    entries: list[str] = []
    stack: list[tuple[int, str]] = []  # (indent, folder path) of the open folders
    for line in lines:
        indent = len(line) - len(line.lstrip(" "))
        names = re.split(r" {2,}", line.strip(), maxsplit=1)[0].split(" ")
        if not all(n.endswith("/") or n.endswith(".py") for n in names):
            continue  # a description's continuation
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        entries += [parent + n for n in names]
        if len(names) == 1 and names[0].endswith("/"):
            stack.append((indent, parent + names[0]))
    return entries


def package_tree() -> set[str]:
    """Every folder (with '/') and module under subpeft/, the package folder itself included."""
    out = {"subpeft/"}
    for path in (ROOT / "subpeft").rglob("*"):
        rel = path.relative_to(ROOT)
        if "__pycache__" in rel.parts or any(p.startswith(".") for p in rel.parts):
            continue
        if path.is_dir():
            out.add(f"{rel.as_posix()}/")
        elif path.suffix == ".py" and path.name != "__init__.py":
            out.add(rel.as_posix())
    return out


def test_readme_layout_is_the_package_tree():
    entries = layout_entries((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(entries) == len(set(entries)), f"listed twice: {sorted({e for e in entries if entries.count(e) > 1})}"
    listed = {e for e in entries if e.startswith("subpeft/")}
    tree = package_tree()
    missing, absent = sorted(tree - listed), sorted(listed - tree)
    assert not missing, f"README Layout does not list {missing}"
    assert not absent, f"README Layout lists {absent}, which do not exist"
    gone = [e for e in entries if not (ROOT / e).exists()]
    assert not gone, f"README Layout lists {gone}, which do not exist"


def test_the_layout_parser_sees_nesting_and_continuations():
    text = f"""{BEGIN}
```
subpeft/
  core/         shared
    a.py b.py   two modules on one line
  c.py          a module whose description
                goes on: x.py here is not an entry
tests/
```
{END}"""
    assert layout_entries(text) == ["subpeft/", "subpeft/core/", "subpeft/core/a.py", "subpeft/core/b.py",
                                    "subpeft/c.py", "tests/"]
