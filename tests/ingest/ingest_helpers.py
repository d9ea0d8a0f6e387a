"""Helpers of the ingestion tests (a small corpus, the stored entries of a store), importable by the test modules."""

from __future__ import annotations

import sqlite3
from pathlib import Path

GOOD = {
    "a.txt": "The vault code of Alpha is 4821.",
    "d.md": "Paris is the capital of France. Berlin is the capital of Germany.",
    "sub/e.txt": "The quick brown fox jumps over the lazy dog 0123456789.",
    "sub/f.md": "The vault code of Beta is 9034.",
}
"""Files every ingest stores, one chunk each."""
BAD = {"b-too-long.txt": "context window", "c.txt": "not UTF-8 text"}
"""Files every ingest reports as failed, with words of the reason."""


def write_corpus(folder: Path, bad: bool = True) -> Path:
    for name, text in GOOD.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    (folder / "empty.txt").write_text("  \n")
    (folder / "copy-of-a.txt").write_text(GOOD["a.txt"] + "\n")  # same chunk as a.txt once stripped
    (folder / "notes.json").write_text("{}")  # not a .txt/.md file: never read
    if bad:
        (folder / "b-too-long.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
        (folder / "c.txt").write_bytes(b"\xff\xfe not utf-8 \xc3")
    return folder


def stored_entries(directory: Path) -> dict[str, bytes]:
    """Every entry of the disk store at `directory`: key -> the bytes of its value file."""
    con = sqlite3.connect(Path(directory) / "cache.db")
    try:
        rows = con.execute("SELECT key, filename FROM Cache WHERE raw = 1").fetchall()
    finally:
        con.close()
    return {key: (Path(directory) / filename).read_bytes() for key, filename in rows}
