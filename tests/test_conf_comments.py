"""Project standard: every key and every defaults-list entry under conf/ carries a one-line `# reason`."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import ROOT

CONF = ROOT / "conf"
KEY = re.compile(r"^(\s*)[+~]?[A-Za-z_][\w.@/-]*\s*:(.*)$")
ITEM = re.compile(r"^(\s*)-(\s|$)")
# A block scalar indicator as the whole value: |, >, |-, >+2, ... (optionally followed by a comment).
BLOCK_SCALAR = re.compile(r"^\s*[|>][-+0-9]*\s*(#.*)?$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _has_comment(line: str) -> bool:
    """True when the line holds a YAML comment: a `#` outside quotes, at the start or after whitespace."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return True
    return False


def uncommented_lines(path: Path) -> list[int]:
    """1-based numbers of the lines of `path` that define a key or a defaults entry without a comment."""
    offenders = []
    block_indent = None  # indent of the key that opened a block scalar (its content is deeper)
    defaults_indent = None  # indent of the `defaults:` key while inside its list
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = _indent(line)
        if block_indent is not None:
            if indent > block_indent:
                continue  # block scalar content
            block_indent = None
        if defaults_indent is not None:
            item = ITEM.match(line)
            if item and indent >= defaults_indent:
                if not _has_comment(line):
                    offenders.append(n)
                continue
            if indent <= defaults_indent:
                defaults_indent = None
        key = KEY.match(line)
        if key is None:
            continue  # a continuation line of a flow value, or a plain list item
        if not _has_comment(line):
            offenders.append(n)
        value = key.group(2)
        if BLOCK_SCALAR.match(value):
            block_indent = indent
        elif stripped.split(":", 1)[0].strip() == "defaults" and not value.strip().split("#", 1)[0].strip():
            defaults_indent = indent
    return offenders


def test_checker_sees_keys_entries_and_block_scalars(tmp_path):
    sample = tmp_path / "x.yaml"
    sample.write_text(
        "# header\n"
        "defaults:\n"
        "  - _self_\n"
        "  - model: minilm  # why\n"
        "a: 1\n"
        "b: 2  # why\n"
        "c: |  # why\n"
        "  d: not a key\n"
        "e: 'has # inside quotes'\n"
        'f: "x"  # why\n'
        "g:\n"
        "  - plain item\n"
    )
    assert uncommented_lines(sample) == [2, 3, 5, 9, 11]


def test_every_conf_key_has_a_reason():
    files = sorted(CONF.rglob("*.yaml"))
    assert files, "no yaml under conf/"
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in files for n in uncommented_lines(p)]
    assert not offenders, f"{len(offenders)} conf lines without a `# reason` comment:\n" + "\n".join(offenders)
