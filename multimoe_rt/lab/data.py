"""The evaluation/training text in shared/data: where it is, how to read it exactly, checksums.

Every reader opens files with ``newline=""`` so no newline translation happens (the checksums and the
WikiText row reconstruction depend on the exact bytes). See shared/data/README.md for the file formats.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DataError", "Dataset", "DATASETS", "data_dir", "read_split", "split_rows", "eval_text",
           "wikitext_rows", "checksums", "verify_checksums"]

ENV_VAR = "MULTIMOE_DATA"
_MARKER = "SHA256SUMS"


class DataError(RuntimeError):
    """Missing data directory/file or a checksum mismatch; the message names the path."""


@dataclass(frozen=True)
class Dataset:
    """One text data set: its folder under the data dir, its splits and how rows are stored.

    layout: "wikitext" (``"\\n".join(rows)`` where rows end in "\\n" or are empty; see ``wikitext_rows``),
    "lines" (one row per line, ``"\\n".join(rows)``), "whole" (the file is one document).
    """
    name: str
    folder: str
    splits: tuple[str, ...]
    layout: str

    def relpath(self, split: str) -> str:
        if split not in self.splits:
            raise DataError(f"data set {self.name!r} has no split {split!r}; splits: {list(self.splits)}")
        return f"{self.folder}/{split}.txt"

    def path(self, split: str = "test", root: str | os.PathLike | None = None) -> Path:
        return (Path(root) if root is not None else data_dir()) / self.relpath(split)


DATASETS: dict[str, Dataset] = {
    "wikitext2": Dataset("wikitext2", "wikitext2", ("validation", "test"), "wikitext"),
    "ptb": Dataset("ptb", "ptb", ("validation", "test"), "lines"),
    "shakespeare": Dataset("shakespeare", "shakespeare", ("train", "test"), "whole"),
    "pycode": Dataset("pycode", "pycode", ("train", "test"), "whole"),
}


def _candidates() -> list[Path]:
    starts = [Path.cwd().resolve(), Path(__file__).resolve().parent]
    out: list[Path] = []
    for s in starts:
        for d in (s, *s.parents):
            for c in (d / "shared" / "data", d / "data"):
                if c not in out:
                    out.append(c)
    return out


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """``path`` if given, else $MULTIMOE_DATA, else the first ``shared/data`` (or ``data``) holding SHA256SUMS
    found walking up from the working directory, then from this package."""
    if path is not None:
        p = Path(path).expanduser()
        if not (p / _MARKER).is_file():
            raise DataError(f"data dir {p} has no {_MARKER} (expected a copy of shared/data)")
        return p.resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not (p / _MARKER).is_file():
            raise DataError(f"${ENV_VAR}={env}: no {_MARKER} there; point it at the shared/data folder")
        return p.resolve()
    tried = _candidates()
    for c in tried:
        if (c / _MARKER).is_file():
            return c.resolve()
    raise DataError(
        f"data directory not found: set ${ENV_VAR}, or run below a folder holding shared/data/{_MARKER}. "
        f"Looked in: {', '.join(str(t) for t in tried[:6])}, ..."
    )


def _get(name: str) -> Dataset:
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name]


def read_split(name: str, split: str = "test", root: str | os.PathLike | None = None) -> str:
    """The exact file contents of a split (no newline translation)."""
    path = _get(name).path(split, root)
    if not path.is_file():
        raise DataError(f"{path}: missing ({name} {split})")
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def wikitext_rows(text: str) -> list[str]:
    """Exact rows of a wikitext file written as ``"\\n".join(rows)``: each row is "" or one line ending in
    "\\n", so a non-empty row is followed by its own newline plus the join newline."""
    parts = text.split("\n")
    rows: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i]:
            rows.append(parts[i] + "\n")
            i += 2
        else:
            rows.append("")
            i += 1
    return rows


def split_rows(name: str, text: str) -> list[str]:
    """The data set's rows (as the HF dataset had them) from a split's file text."""
    layout = _get(name).layout
    if layout == "wikitext":
        return wikitext_rows(text)
    if layout == "lines":
        return text.split("\n")
    return [text]


def eval_text(name: str, split: str = "test", root: str | os.PathLike | None = None) -> str:
    """The text the upstream perplexity protocol tokenizes: ``"\\n\\n".join(rows)`` for wikitext2 and ptb
    (as Multi-MoE's ppl_evaluator.py), the whole file for shakespeare and pycode."""
    text = read_split(name, split, root)
    if _get(name).layout == "whole":
        return text
    return "\n\n".join(split_rows(name, text))


def checksums(files=None, root: str | os.PathLike | None = None) -> dict[str, str]:
    """sha256 of each file (relative paths; default: every file listed), checked against SHA256SUMS.

    Returns {relative path: sha256}; raises DataError naming the first missing or mismatching file.
    """
    base = data_dir(root)
    sums_path = base / _MARKER
    sums = {}
    for line in sums_path.read_text().splitlines():
        if line.strip():
            want, rel = line.split(maxsplit=1)
            sums[rel.lstrip("*").removeprefix("./")] = want
    out = {}
    for rel in sorted(set(files) if files is not None else sums):
        if rel not in sums:
            raise DataError(f"{sums_path}: no checksum for {rel}")
        path = base / rel
        if not path.is_file():
            raise DataError(f"{path}: missing data file (listed in {_MARKER})")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != sums[rel]:
            raise DataError(f"{path}: sha256 {h.hexdigest()} does not match {_MARKER} ({sums[rel]})")
        out[rel] = h.hexdigest()
    return out


def verify_checksums(root: str | os.PathLike | None = None) -> list[str]:
    """Check every file listed in SHA256SUMS; returns the checked relative paths."""
    return list(checksums(root=root))
