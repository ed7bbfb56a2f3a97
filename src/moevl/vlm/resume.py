"""Which Trainer checkpoint of a run ``--resume`` continues from: the newest complete one, a damaged one named
(its save cut short, a file cut short or corrupt), read from headers only."""

from __future__ import annotations

import json
import os
from pathlib import Path


def checkpoint_damage(path: Path) -> str | None:
    """Why the Trainer checkpoint ``path`` cannot be resumed from, or None when it is whole: its save was cut
    short (the Trainer writes ``trainer_state.json`` last), or a file in it is cut short or corrupt. Reads headers
    only: each safetensors file's header against its length, each torch file's zip directory (at its end)."""
    state = path / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json: its save was cut short"
    try:
        json.loads(state.read_text())
    except (ValueError, UnicodeDecodeError):
        return "trainer_state.json is not valid JSON"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "no weights (*.safetensors)"
    for index in path.glob("*.safetensors.index.json"):
        try:
            files = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} is not a valid weights index"
        missing = sorted(f for f in files if not (path / f).is_file())
        if missing:
            return f"{index.name} lists {missing[0]}, which is missing"
    for file in weights:
        damage = _safetensors_damage(file)
        if damage is not None:
            return damage
    for file in sorted(p for pattern in ("*.pt", "*.pth", "*.bin") for p in path.rglob(pattern)):
        damage = _torch_file_damage(file)
        if damage is not None:
            return f"{file.relative_to(path)} {damage}"
    return None


def _safetensors_damage(file: Path) -> str | None:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or 8 + length > size:
            return f"{file.name} is cut short ({size} bytes, not even its header)"
        try:
            header = json.loads(f.read(length))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return f"{file.name} has an unreadable header"
    if 8 + length + end > size:
        return f"{file.name} is cut short ({size} of {8 + length + end} bytes)"
    return None


def _torch_file_damage(file: Path) -> str | None:
    """A torch.save file (a zip archive) whose directory at the end is missing or unreadable: cut short."""
    import zipfile

    with open(file, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return None  # not a zip archive (torch's legacy format, a tokenizer file): not checked
    try:
        with zipfile.ZipFile(file):
            return None
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        return f"is cut short or corrupt ({e})"


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """The ``checkpoint-N`` directories of ``output_dir``, newest first."""
    if not output_dir.is_dir():
        return []
    steps = ((p.name.removeprefix("checkpoint-"), p) for p in output_dir.glob("checkpoint-*"))
    found = [(int(n), p) for n, p in steps if n.isdigit()]
    return sorted(((n, p) for n, p in found if p.is_dir()), reverse=True)


def last_checkpoint(
    output_dir: str | os.PathLike, *, damaged: list[tuple[Path, str]] | None = None
) -> Path | None:
    """The newest whole ``checkpoint-N`` in ``output_dir`` (``checkpoint_damage``), or None. The newer ones that
    are not whole are appended to ``damaged`` as ``(path, why)`` when it is given."""
    for _, path in _checkpoints(Path(output_dir)):
        why = checkpoint_damage(path)
        if why is None:
            return path
        if damaged is not None:
            damaged.append((path, why))
    return None
