"""Record sources: JSON, JSONL (optionally gzipped), Parquet, `datasets` folders, the Hub.

``open_source(path, split)`` returns a :class:`RecordSource` whose ``records()`` yields
``(record_number, record_or_error, line)``. A record that cannot even be read
(malformed JSON line, bytes that are not UTF-8) is yielded as a :class:`DataError`
so the caller decides whether to stop or count it. Problems with the whole file
(missing, unreadable, not a list of records) raise :class:`DataError` at once.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from poet_jax.data.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
JSON_SUFFIXES = (".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _has_bad_utf8(obj: Any) -> bool:
    """True if a JSON value holds a string with surrogate-escaped (non-UTF-8) bytes."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(obj, dict):
        return any(_has_bad_utf8(k) or _has_bad_utf8(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_bad_utf8(v) for v in obj)
    return False


@dataclasses.dataclass
class RecordSource:
    """One readable source of preference records.

    ``name``: what error messages call it (the path or the data-set name).
    ``kind``: "jsonl" | "json" | "parquet" | "datasets" | "hub".
    ``fingerprint``: a content hash used as part of the tokenization cache key.
    """

    name: str
    kind: str
    fingerprint: str
    _path: Path | None = None
    _dataset: Any = None

    def records(self) -> Iterator[tuple[int, Any, int | None]]:
        if self.kind == "jsonl":
            yield from self._jsonl()
        elif self.kind == "json":
            yield from self._json()
        elif self.kind == "parquet":
            yield from self._parquet()
        else:
            for i, rec in enumerate(self._dataset):
                yield i, rec, None

    def __len__(self) -> int:  # only cheap for in-memory kinds; used for progress bars
        if self._dataset is not None:
            return len(self._dataset)
        raise TypeError("length unknown before reading")

    # -- readers -------------------------------------------------------------------
    def _read_bytes(self) -> bytes:
        assert self._path is not None
        try:
            if self._path.name.endswith(".gz"):
                with gzip.open(self._path, "rb") as f:
                    return f.read()
            return self._path.read_bytes()
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            raise DataError(self.name, None, "file", f"cannot read the file: {err}") from err

    def _jsonl(self) -> Iterator[tuple[int, Any, int | None]]:
        data = self._read_bytes()
        if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
            data = data[3:]
        rec = 0
        for lineno, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue  # blank lines are not records
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield rec, DataError(self.name, rec, "non_utf8", f"invalid UTF-8 byte at column {err.start + 1}", lineno), lineno
                rec += 1
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                yield rec, DataError(self.name, rec, "malformed_json", f"{err.msg} at column {err.colno}", lineno), lineno
            else:
                yield rec, obj, lineno
            rec += 1

    def _json(self) -> Iterator[tuple[int, Any, int | None]]:
        data = self._read_bytes()
        text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
        dec = json.JSONDecoder()
        pos = _skip_ws(text, 0)
        if pos >= len(text):
            raise DataError(self.name, None, "file", "the file is empty")
        if text[pos] == "{":
            # `datasets`' to_json writes JSON Lines into *.json files.
            yield from self._json_lines_text(text)
            return
        if text[pos] != "[":
            raise DataError(self.name, None, "file", f"expected a JSON list of records, found {text[pos]!r} at the start")
        pos = _skip_ws(text, pos + 1)
        rec = 0
        line = 1 + text.count("\n", 0, pos)
        last = pos
        if pos < len(text) and text[pos] == "]":
            return
        while True:
            line += text.count("\n", last, pos)
            last = pos
            try:
                obj, end = dec.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                # An array cannot be resynchronised after a syntax error: always fatal.
                raise DataError(
                    self.name, rec, "malformed_json",
                    f"{err.msg} (line {err.lineno}, column {err.colno}); a malformed JSON list cannot be "
                    "skipped past, fix the file or convert it to JSON Lines", line,
                ) from err
            if _has_bad_utf8(obj):
                yield rec, DataError(self.name, rec, "non_utf8", "a string holds bytes that are not valid UTF-8", line), line
            else:
                yield rec, obj, line
            rec += 1
            pos = _skip_ws(text, end)
            if pos < len(text) and text[pos] == ",":
                pos = _skip_ws(text, pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                if _skip_ws(text, pos + 1) != len(text):
                    raise DataError(self.name, None, "file", "extra data after the closing ']'")
                return
            raise DataError(
                self.name, rec, "malformed_json",
                f"expected ',' or ']' after record {rec - 1} (line {1 + text.count(chr(10), 0, pos)})",
            )

    def _json_lines_text(self, text: str) -> Iterator[tuple[int, Any, int | None]]:
        rec = 0
        for lineno, raw in enumerate(text.split("\n"), start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as err:
                yield rec, DataError(self.name, rec, "malformed_json", f"{err.msg} at column {err.colno}", lineno), lineno
            else:
                if _has_bad_utf8(obj):
                    yield rec, DataError(self.name, rec, "non_utf8", "a string holds bytes that are not valid UTF-8", lineno), lineno
                else:
                    yield rec, obj, lineno
            rec += 1

    def _parquet(self) -> Iterator[tuple[int, Any, int | None]]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self._path)
        except Exception as err:  # pyarrow raises several types for bad files
            raise DataError(self.name, None, "file", f"cannot read the Parquet file: {err}") from err
        rec = 0
        for batch in pf.iter_batches(batch_size=4096):
            for obj in batch.to_pylist():
                yield rec, obj, None
                rec += 1


def _skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in " \t\r\n":
        pos += 1
    return pos


def open_source(path: str | os.PathLike, split: str = "train") -> RecordSource:
    """Open ``path``: a JSON/JSONL(.gz)/Parquet file, a ``datasets.save_to_disk`` folder,
    or (if no such path exists and it looks like ``owner/name``) a Hugging Face Hub data set.

    ``split`` selects the split of a DatasetDict folder or a Hub data set.
    """
    p = Path(path)
    name = str(path)
    if p.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as err:
            raise DataError(name, None, "file", f"not a `datasets` folder saved with save_to_disk: {err}") from err
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(name, None, "file", f"split {split!r} not found; available: {sorted(ds)}")
            ds = ds[split]
        return RecordSource(name, "datasets", f"datasets:{ds._fingerprint}", _dataset=ds)
    if p.is_file():
        lower = p.name.lower()
        if lower.endswith(JSONL_SUFFIXES):
            kind = "jsonl"
        elif lower.endswith(JSON_SUFFIXES):
            kind = "json"
        elif lower.endswith(PARQUET_SUFFIXES):
            kind = "parquet"
        else:
            raise DataError(
                name, None, "file",
                "unknown file type; expected .json, .jsonl, .ndjson (optionally .gz) or .parquet",
            )
        return RecordSource(name, kind, f"{kind}:{_file_sha256(p)}", _path=p)
    if not name.startswith((".", "/", "~")) and name.count("/") == 1 and not p.suffix:
        import datasets

        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as err:
            raise DataError(name, None, "file", f"could not load the Hub data set (split {split!r}): {err}") from err
        return RecordSource(name, "hub", f"hub:{name}:{split}:{ds._fingerprint}", _dataset=ds)
    raise DataError(name, None, "file", "no such file or folder")
