"""The markdown config reference, generated from the config schema.

Every key of :class:`poet_jax.train.config.Config` (its type, default and one-line
meaning, from :func:`poet_jax.train.config.schema_rows`) becomes a row of a markdown
table, one table per top-level section. The README carries the generated text between
two marker comments, so it cannot drift from the code::

    python -m poet_jax.train.config_reference                  # print the reference
    python -m poet_jax.train.config_reference --write README.md  # refresh the README's block
    python -m poet_jax.train.config_reference --check README.md  # exit 1 if it is out of date

Only the text between :data:`START` and :data:`END` is replaced; the rest of the file is
kept byte for byte.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .config import schema_rows, sections

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
REGENERATE = "python -m poet_jax.train.config_reference --write README.md"


class ReferenceMarkerError(ValueError):
    """A file lacks the config-reference markers, or has them twice or out of order."""


def format_default(value: Any) -> str:
    """A schema default as YAML users write it: ``true``, ``0.1``, ``5.0e-07``, ``"fit"``, ``[]``, ``{}``.

    Floats in exponent form get a decimal point (``5.0e-07``, not ``5e-07``): YAML 1.1
    readers such as PyYAML read ``5e-07`` as a string.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)  # pragma: no cover - the schema only has the types above


def _cell(text: str) -> str:
    """Markdown table cell: escape pipes, keep one line."""
    return " ".join(str(text).split()).replace("|", "\\|")


def render_reference(rows: list[dict] | None = None, section_help: dict[str, str] | None = None) -> str:
    """Markdown reference of every config key.

    Args:
      rows: ``schema_rows()`` style dicts (``key``, ``type``, ``default``, ``help``, ``choices``);
        default: the live schema.
      section_help: top-level section -> meaning; default: ``sections()``.

    Returns:
      the markdown text (ends with a newline): a note on how it was generated, then one
      ``### `section` `` heading and table (key | type | default | meaning) per section,
      in schema order. Allowed values are listed in the meaning column.
    """
    rows = schema_rows() if rows is None else rows
    section_help = sections() if section_help is None else section_help
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["key"].split(".", 1)[0], []).append(row)
    out = [
        f"_Generated from the schema in `poet_jax/train/config.py` (do not edit by hand; regenerate with "
        f"`{REGENERATE}`)._",
        "",
        f"{len(rows)} keys in {len(groups)} sections. Set them in the YAML file (nested mappings) or on the "
        "command line as dotted `key=value` overrides, e.g. `data.use_poet=true optim.lr=1e-6`.",
    ]
    for name, group in groups.items():
        meaning = section_help.get(name, "")
        out += ["", f"### `{name}`" + (f": {meaning}" if meaning else ""), ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for row in group:
            help_text = row["help"]
            choices = row.get("choices") or ()
            if choices and not all(str(c) in help_text for c in choices):
                help_text += " (one of: " + ", ".join(f"`{c}`" for c in choices) + ")"
            out.append(
                f"| `{row['key']}` | {row['type']} | `{_cell(format_default(row['default']))}` | {_cell(help_text)} |"
            )
    return "\n".join(out) + "\n"


def _marker_positions(text: str, where: str) -> tuple[int, int]:
    n_start, n_end = text.count(START), text.count(END)
    if n_start != 1 or n_end != 1:
        raise ReferenceMarkerError(
            f"{where}: needs exactly one {START} and one {END} line (found {n_start} and {n_end})"
        )
    i, j = text.index(START), text.index(END)
    if j < i:
        raise ReferenceMarkerError(f"{where}: {END} comes before {START}")
    return i, j


def extract_block(text: str, where: str = "the text") -> str:
    """The text between the markers (without them and without the newline after the start marker)."""
    i, j = _marker_positions(text, where)
    block = text[i + len(START):j]
    return block[1:] if block.startswith("\n") else block


def replace_block(text: str, block: str, where: str = "the text") -> str:
    """``text`` with the part between the markers replaced by ``block`` (markers kept)."""
    i, j = _marker_positions(text, where)
    return text[: i + len(START)] + "\n" + block + text[j:]


def write_reference(path: str | Path) -> bool:
    """Refresh the generated block of the file at ``path`` in place; returns whether it changed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    new = replace_block(text, render_reference(), str(path))
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def is_current(path: str | Path) -> bool:
    """Whether the file's generated block equals a freshly generated reference."""
    path = Path(path)
    return extract_block(path.read_text(encoding="utf-8"), str(path)) == render_reference()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m poet_jax.train.config_reference",
        description="Print the markdown config reference, or refresh / check the block between "
        f"{START} and {END} in a file.",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", metavar="FILE", help="replace the generated block of FILE (e.g. README.md)")
    g.add_argument("--check", metavar="FILE", help="exit 1 if FILE's generated block is out of date")
    args = p.parse_args(argv)
    try:
        if args.write:
            changed = write_reference(args.write)
            print(f"{args.write}: config reference {'updated' if changed else 'already up to date'}")
        elif args.check:
            if not is_current(args.check):
                print(f"{args.check}: config reference is out of date; run {REGENERATE}", file=sys.stderr)
                return 1
            print(f"{args.check}: config reference is up to date")
        else:
            sys.stdout.write(render_reference())
    except (ReferenceMarkerError, FileNotFoundError) as err:
        print(f"config_reference: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
