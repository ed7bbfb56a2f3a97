"""Every file moevl writes goes to a temporary name beside its target, then ``os.replace``: a crash or a
Ctrl-C leaves either the old complete file or the new complete file, never half of one.

Directories likewise: ``atomic_directory`` yields a temporary directory beside the target, and
``replace_directory`` renames the complete one into place (whole, or merged into an existing directory).
Logs that several processes add to are appended a whole line at a time (``append_line``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def _target(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"path must be a file path, got {str(path)!r} which is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _temporary(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path`` with the mode ``open()`` would give (``0o666 & ~umask``).

    NOTE: ``mkstemp`` makes files readable by the owner only; without the chmod every file moevl
    writes would be private, unlike what the user's umask asks for.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], *, binary: bool = False) -> Path:
    """Calls ``write(f)`` on a temporary file beside ``path``, then renames it to ``path``."""
    path = _target(path)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | os.PathLike, payload: Any, *, indent: int | None = 2) -> Path:
    return atomic_write(path, lambda f: json.dump(payload, f, indent=indent, default=_json_default))


def atomic_write_jsonl(path: str | os.PathLike, rows: list[Any]) -> Path:
    def write(f: IO[str]) -> None:
        for row in rows:
            f.write(json.dumps(row, default=_json_default) + "\n")

    return atomic_write(path, write)


def append_line(path: str | os.PathLike, line: str) -> Path:
    """Appends ``line`` and a newline to ``path`` (created if missing) in one ``write`` on a file opened for
    appending: a log that several processes add to (DataLoader workers, ranks); a reader sees whole lines
    (a crash can cut only the last one short, never an earlier one)."""
    path = _target(path)
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


def atomic_write_to(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Calls ``write(tmp_path)`` for writers that want a file name (``torch.save``, safetensors,
    ``savefig``), on a temporary file beside ``path``, then renames it to ``path``."""
    path = _target(path)
    fd, tmp = _temporary(path)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_savefig(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``fig.savefig`` (matplotlib) through a temporary file; the format comes from ``path``'s suffix."""
    fmt = kwargs.pop("format", None) or Path(path).suffix.lstrip(".") or "png"
    return atomic_write_to(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def check_writable(path: str | os.PathLike, *, directory: bool = False, name: str = "path") -> Path:
    """``path`` if a file (or, with ``directory``, a folder) could be written there; creates nothing.

    Commands call this on every output path before they start work, so a typo costs seconds, not a
    training run. Raises ``ValueError`` naming the argument (``name``, e.g. ``--output``), the path and
    the reason.
    """
    path = Path(path)
    kind = "a directory" if directory else "a file path"
    if path.exists():
        if directory != path.is_dir():
            what = "a directory" if path.is_dir() else "a file"
            raise ValueError(f"{name} must be {kind}, got {str(path)!r} which is {what}")
        if not os.access(path if directory else path.parent, os.W_OK | os.X_OK):
            raise ValueError(
                f"{name} must be {kind} that can be written, got {str(path)!r} (permission denied)"
            )
        return path
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(
            f"{name} must be {kind}, got {str(path)!r}: {str(ancestor)!r} is a file, not a directory"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(
            f"{name} must be {kind} that can be written, got {str(path)!r} ({str(ancestor)!r} is read-only)"
        )
    return path


def _json_default(obj: Any) -> Any:
    try:
        return float(obj)
    except (TypeError, ValueError):
        return str(obj)


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike,
    *,
    merge: bool = False,
    marker: str | None = None,
    stale: Callable[[str], object] | None = None,
    commit: bool = True,
) -> Iterator[Path]:
    """Yields a new temporary directory beside ``path`` to write into; on success ``replace_directory`` puts
    it in ``path``'s place (``merge``, ``marker``, ``stale`` are its options), on error it is removed and
    ``path`` is untouched. With ``commit=False`` it is removed and ``path`` is untouched either way (the
    processes of a distributed save that take part in it but write nothing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if commit:
            replace_directory(tmp, path, merge=merge, marker=marker, stale=stale)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing there once renamed into place


def replace_directory(
    source: str | os.PathLike,
    path: str | os.PathLike,
    *,
    merge: bool = False,
    marker: str | None = None,
    stale: Callable[[str], object] | None = None,
) -> Path:
    """Renames the complete directory ``source`` to ``path`` (same file system).

    Without ``merge``, ``source`` replaces ``path`` whole: an older directory there is moved aside first
    and removed only once the new one is in place.

    With ``merge``, a missing or empty ``path`` is replaced in one rename as well; into a directory with
    entries, ``source``'s entries are moved one by one, replacing those of the same name, and ``path``'s
    other entries stay, except the files for which ``stale(name)`` is true, which are removed. ``marker``
    names the file that marks the directory complete (a checkpoint's ``config.json``): it is removed first
    and moved in last, so that an interrupted merge leaves a directory without it, never new files under an
    old marker.
    """
    source, path = Path(source), Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    if merge and path.exists():
        _merge_directory(source, path, marker=marker, stale=stale)
        return path
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old / "dir")
    os.replace(source, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _merge_directory(
    source: Path, path: Path, *, marker: str | None, stale: Callable[[str], object] | None
) -> None:
    if not any(path.iterdir()):
        with contextlib.suppress(OSError):  # an empty folder is replaced in one rename (POSIX)
            os.replace(source, path)
            return
    new = {p.name for p in source.iterdir()}
    if marker is not None:
        (path / marker).unlink(missing_ok=True)
    for old in path.iterdir():
        if old.name not in new and stale is not None and old.is_file() and stale(old.name):
            old.unlink()
    for name in sorted(new - {marker}):
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(source / name, target)
    if marker in new:
        os.replace(source / marker, path / marker)
