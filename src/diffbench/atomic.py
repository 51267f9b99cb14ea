"""Writes that a reader (or a crash) never sees half done: write a uniquely named sibling, then
rename it over the target. Every file the suite writes goes through here."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from diffbench.config import ConfigError


def current_umask() -> int:
    """The process's umask: from /proc where Linux shows it, else by setting it and straight back
    (which another thread could see for an instant)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(path: Path) -> int:
    """The mode the file should have: the one it has, when it is replaced, or what open() would
    give a new file under the user's umask (a temporary file is created 0600 whatever the umask)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def nearest_existing(path: Path) -> Path:
    return next((p for p in (path, *path.parents) if p.exists()), Path("."))


def unwritable_reason(path: Path) -> str:
    """Why `writable_folder(path)` is false, naming the ancestor that stops it."""
    parent = nearest_existing(Path(path))
    return f"{parent} is a file" if not parent.is_dir() else f"{parent} is not writable"


def writable_folder(path: Path) -> bool:
    """Whether `path` is, or could be created as, a folder this process can write in: tried by
    creating (and at once removing) a file in its nearest existing ancestor, since permission bits
    say nothing for root or for read-only and virtual file systems."""
    parent = nearest_existing(Path(path))
    if not parent.is_dir():
        return False
    try:
        with tempfile.TemporaryFile(dir=parent):
            return True
    except OSError:
        return False


def refuse_read_only(path: Path) -> None:
    """A file its owner made read-only is not replaced: the rename would bypass that."""
    if path.exists() and not (path.stat().st_mode & stat.S_IWUSR and os.access(path, os.W_OK)):
        raise ConfigError(
            f"{path} is read-only, so it is not replaced; make it writable (chmod u+w {path}) or work on a "
            "copy. Nothing was written."
        )


def check_replaceable(path: Path) -> None:
    """Before any work: the file may be replaced and its folder can take the temporary file."""
    path = Path(path)
    refuse_read_only(path)
    if not writable_folder(path.parent):
        raise ConfigError(
            f"cannot write {path}: {unwritable_reason(path.parent)}; choose a folder you can write. "
            "Nothing was written."
        )


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (unique per writer) and move it onto `path` once the
    block succeeds, with `file_mode`; on error the temporary file is removed and `path` is left as
    it was."""
    path = Path(path)
    refuse_read_only(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, file_mode(path))
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
