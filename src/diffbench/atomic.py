"""Writes that a reader (or a crash) never sees half done: write a uniquely named sibling, then
rename it over the target. Every file the suite writes goes through here."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (unique per writer) and move it onto `path` once the
    block succeeds; on error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_with(path: Path, writer: Callable[[Path], object]) -> Path:
    """`writer(tmp)` writes the file (torch.save, savefig, save_image…); then it is renamed."""
    with replacing(path) as tmp:
        writer(tmp)
    return Path(path)
