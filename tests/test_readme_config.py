"""The README's config reference is the generated one, lists every key, and shows the real defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from poet_jax.train import config_reference as cr
from poet_jax.train.config import Config, config_to_dict, schema_rows

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ROW = re.compile(r"^\| `([\w.]+)` \| (\w+) \| `(.*)` \| (.*) \|$")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:  # a section (empty dicts, e.g. loss.extra, are leaf values)
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _readme_rows() -> dict[str, tuple[str, str, str]]:
    block = cr.extract_block(README.read_text(encoding="utf-8"), "README.md")
    rows = {}
    for line in block.splitlines():
        m = ROW.match(line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} listed twice"
            rows[m.group(1)] = (m.group(2), m.group(3), m.group(4))
    return rows


def test_readme_block_is_the_generated_reference():
    text = README.read_text(encoding="utf-8")
    assert cr.extract_block(text, "README.md") == cr.render_reference(), (
        "README.md's config reference is out of date: run python -m poet_jax.train.config_reference --write README.md"
    )
    assert text.index(cr.START) > text.index("## Configuration reference")


def test_every_key_is_in_the_readme_with_its_real_default():
    rows = _readme_rows()
    defaults = _flatten(config_to_dict(Config()))  # the dataclasses themselves, not schema_rows
    assert set(rows) == set(defaults), (set(rows) ^ set(defaults))
    assert [r["key"] for r in schema_rows()] == list(rows)  # schema order
    types = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}
    for key, (type_name, default, meaning) in rows.items():
        assert yaml.safe_load(default) == defaults[key], key  # what a user would write in YAML
        assert type(yaml.safe_load(default)) is type(defaults[key]), key
        assert type_name == types[type(defaults[key])], key
        assert meaning.strip(), f"{key} has no meaning"


def test_render_small_schema_exactly():
    rows = [
        {"key": "a.x", "type": "int", "default": 3, "help": "count | pipes", "choices": None},
        {"key": "a.mode", "type": "str", "default": "fit", "help": "how", "choices": ("fit", "cut")},
        {"key": "a.on", "type": "bool", "default": False, "help": "switch: yes, no", "choices": ("yes", "no")},
        {"key": "b.lr", "type": "float", "default": 5e-7, "help": "rate", "choices": None},
        {"key": "b.l", "type": "list", "default": [], "help": "lengths", "choices": None},
    ]
    got = cr.render_reference(rows, {"a": "first", "b": ""})
    want = "\n".join([
        "_Generated from the schema in `poet_jax/train/config.py` (do not edit by hand; regenerate with "
        "`python -m poet_jax.train.config_reference --write README.md`)._",
        "",
        "5 keys in 2 sections. Set them in the YAML file (nested mappings) or on the command line as dotted "
        "`key=value` overrides, e.g. `data.use_poet=true optim.lr=1e-6`.",
        "",
        "### `a`: first",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
        "| `a.x` | int | `3` | count \\| pipes |",
        "| `a.mode` | str | `\"fit\"` | how (one of: `fit`, `cut`) |",
        "| `a.on` | bool | `false` | switch: yes, no |",
        "",
        "### `b`",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
        "| `b.lr` | float | `5.0e-07` | rate |",
        "| `b.l` | list | `[]` | lengths |",
        "",
    ])
    assert got == want


def test_replace_keeps_the_rest_and_rejects_bad_markers():
    text = f"intro\n{cr.START}\nold\n{cr.END}\noutro\n"
    new = cr.replace_block(text, "new\n")
    assert new == f"intro\n{cr.START}\nnew\n{cr.END}\noutro\n"
    assert cr.extract_block(new) == "new\n"
    for bad in ("no markers", f"{cr.END}\n{cr.START}\n", f"{cr.START}\n{cr.START}\n{cr.END}\n"):
        with pytest.raises(cr.ReferenceMarkerError, match="x.md"):
            cr.replace_block(bad, "b", "x.md")


def test_cli_write_and_check(tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text(f"# t\n{cr.START}\nstale\n{cr.END}\ntail\n")
    assert cr.main(["--check", str(doc)]) == 1
    assert cr.main(["--write", str(doc)]) == 0
    assert "updated" in capsys.readouterr().out
    assert cr.main(["--check", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith(f"# t\n{cr.START}\n") and text.endswith(f"{cr.END}\ntail\n")
    assert cr.extract_block(text) == cr.render_reference()
    assert cr.main(["--write", str(doc)]) == 0 and "already up to date" in capsys.readouterr().out
    (tmp_path / "none.md").write_text("nothing here\n")
    assert cr.main(["--write", str(tmp_path / "none.md")]) == 2
    assert "config-reference:start" in capsys.readouterr().err
    assert cr.main(["--check", str(tmp_path / "missing.md")]) == 2
