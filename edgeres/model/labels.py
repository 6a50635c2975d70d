"""Class names: read from a ``--labels`` file (one name per line, or a TSV/CSV with an index column and name
columns such as ImageNet's ``classes.tsv``) and checked wherever labels enter (file, checkpoint, manifest)."""

from __future__ import annotations

import csv
import io
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from edgeres.errors import InputError

# header names of the column holding the class index, and of the column shown as the class name
INDEX_COLUMNS = ("index", "idx", "class_index", "class_id", "id", "label_index")
NAME_COLUMNS = ("name", "label", "class_name", "class", "names", "labels", "description")
MAX_LABEL_FILE_BYTES = 64 << 20


@dataclass(frozen=True)
class LabelSet:
    """One display name per class, plus other names each class goes by (e.g. its wnid) for folder matching."""

    names: tuple[str, ...]
    keys: tuple[tuple[str, ...], ...] | None = None


def label_problem(labels, what: str = "label") -> str | None:
    """Why ``labels`` cannot be written to labels.txt and metadata (naming the index), or None."""
    if not isinstance(labels, (list, tuple)):
        return f"{what}s are {type(labels).__name__}, not a list of names"
    for i, name in enumerate(labels):
        if not isinstance(name, str):
            return f"{what} {i} is {name!r} ({type(name).__name__}), not a string"
        if not name.strip():
            return f"{what} {i} is empty"
        bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
        if bad is not None:
            return (f"{what} {i} ({name.encode('unicode_escape').decode()}) contains the control character "
                    f"U+{ord(bad):04X}; a label is one line of printable text")
    return None


def read_labels(path: str | Path) -> LabelSet:
    """The class names in ``path``; ``InputError`` naming the file and line on anything unreadable."""
    p = Path(path)
    where = f"--labels {p}"
    if not p.is_file():
        raise InputError(f"{where}: no such file; give a text file with one class name per line, or a TSV/CSV "
                         "with an index column and a name column")
    if p.stat().st_size > MAX_LABEL_FILE_BYTES:
        raise InputError(f"{where}: is {p.stat().st_size:,} bytes, too large for a list of class names")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    if not lines:
        raise InputError(f"{where}: is empty; give one class name per line")
    delimiter = "\t" if (p.suffix.lower() == ".tsv" or "\t" in lines[0]) else "," if p.suffix.lower() == ".csv" else None
    labels = _table(lines, delimiter, where) if delimiter else _plain(lines, where)
    problem = label_problem(labels.names, "class name")
    if problem:
        raise InputError(f"{where}: {problem}")
    if labels.keys is not None:
        problem = label_problem([k for ks in labels.keys for k in ks], "class key")
        if problem:
            raise InputError(f"{where}: a key column holds a name that cannot be used ({problem})")
    return labels


def _plain(lines: list[str], where: str) -> LabelSet:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise InputError(f"{where}: line {number} is empty; give one class name per line (class {number - 1})")
    return LabelSet(tuple(lines))


def _table(lines: list[str], delimiter: str, where: str) -> LabelSet:
    rows = list(csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter))
    header = [c.strip().lower() for c in rows[0]]
    has_header = not rows[0] or not rows[0][0].strip().lstrip("-").isdigit()
    body = rows[1:] if has_header else rows
    width = len(rows[0])
    for number, row in enumerate(body, 2 if has_header else 1):
        if len(row) != width:
            raise InputError(f"{where}: line {number} has {len(row)} column(s) but the first line has {width}")
    if not body:
        raise InputError(f"{where}: has a header but no classes")
    index_col = next((header.index(c) for c in INDEX_COLUMNS if has_header and c in header), None)
    if index_col is None and all(row[0].strip().isdigit() for row in body) and width > 1:
        index_col = 0
    text_cols = [c for c in range(width) if c != index_col]
    if not text_cols:
        raise InputError(f"{where}: has only an index column; add a column with the class names")
    name_col = next((header.index(c) for c in NAME_COLUMNS if has_header and c in header and header.index(c) != index_col),
                    text_cols[-1])
    key_cols = [c for c in text_cols if c != name_col]
    if index_col is None:
        order = list(range(len(body)))
    else:
        order = []
        for number, row in enumerate(body, 2 if has_header else 1):
            value = row[index_col].strip()
            if not value.isdigit():
                raise InputError(f"{where}: line {number}: index {value!r} is not a whole number")
            order.append(int(value))
        if sorted(order) != list(range(len(body))):
            seen, dup = set(), None
            for i in order:
                dup = i if i in seen and dup is None else dup
                seen.add(i)
            missing = next((i for i in range(len(body)) if i not in seen), None)
            why = f"index {dup} appears twice" if dup is not None else f"index {missing} is missing"
            raise InputError(f"{where}: {why}; the index column must hold 0..{len(body) - 1} once each")
    by_index = sorted(zip(order, body))
    names = tuple(row[name_col] for _, row in by_index)
    keys = tuple(tuple(row[c] for c in key_cols) for _, row in by_index) if key_cols else None
    return LabelSet(names, keys)


def check_label_count(labels: LabelSet, num_classes: int, source: str) -> None:
    if len(labels.names) != num_classes:
        raise InputError(f"{source}: holds {len(labels.names)} class names but the model has {num_classes} classes; "
                         "give one name per class, in class-index order")
