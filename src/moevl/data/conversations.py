"""Conversation records in, checked: LLaVA conversation files and the TRL / ``datasets`` messages format.

Every record becomes a ``Record`` whose ``messages`` are in the Hugging Face chat format the processors'
chat templates read (``{"role": ..., "content": [{"type": "text", "text": ...} | {"type": "image"}]}``),
with its images as lazy references (a path, or the bytes / PIL image a ``datasets`` column holds).

Formats (auto-detected):

* LLaVA: a JSON list or JSONL of ``{"id", "image": "rel/path.jpg" | [paths] | absent,
  "conversations": [{"from": "human" | "gpt" | "system", "value": "<image>\\n..."}, ...]}``; relative
  paths are resolved against ``image_folder``. Each ``<image>`` marker becomes an image part at its
  place; the newline LLaVA writes right after a marker is dropped with it (the chat template lays the
  parts out). A record with images but no marker gets them before the first user text (LLaVA's rule).
  JSON files are UTF-8 (a byte-order mark is allowed); a single JSON object is one record.
* Messages: records with ``messages`` (``role`` + ``content`` as a string or a list of parts) and an
  ``images`` list, from json / jsonl / parquet or a directory written by ``datasets``' ``save_to_disk``.

A bad record (malformed conversation, roles that do not alternate, no assistant turn, an image count
that does not match the image markers, a missing or unreadable image) raises ``DataError`` naming the
record's id and where it is (file and line or index); with ``on_bad="skip"`` it is skipped and counted.
Image files are checked by reading their header (``PIL.Image.open`` + ``.size``) and their last bytes (a file cut
short is decoded to be sure: ``ImageRef.check``), not decoded otherwise; ``open_images`` decodes them later and
names the record whose image fails there.
"""

from __future__ import annotations

import codecs
import dataclasses
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moevl.checks import check_choice

IMAGE_MARKER = "<image>"
_LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class DataError(ValueError):
    """A data file or record that cannot be used; the message names the record id and the file."""


@dataclass(frozen=True)
class ImageRef:
    """A lazily loaded image: a file path, or encoded bytes / a PIL image held in memory."""

    path: Path | None = None
    data: Any = None  # bytes or a PIL.Image.Image
    known_size: tuple[int, int] | None = field(
        default=None, compare=False
    )  # (w, h), read once by read_records

    def open(self):
        """The image as an RGB ``PIL.Image`` (decoded now)."""
        from PIL import Image

        if self.path is not None:
            with Image.open(self.path) as im:
                return im.convert("RGB")
        if isinstance(self.data, bytes | bytearray):
            with Image.open(io.BytesIO(self.data)) as im:
                return im.convert("RGB")
        return self.data.convert("RGB")

    def check(self) -> tuple[int, int]:
        """(width, height) from the header, once the file is known to be whole: where its format says how a file
        ends (``_ENDS``) and its last bytes do not, the image is decoded to be sure (bytes after the end are
        allowed), so that a file cut short fails here and not in the middle of training. Raises what PIL raises
        for an unreadable file (``OSError``, ``ValueError``, ...)."""
        from PIL import Image

        if self.path is None and not isinstance(self.data, bytes | bytearray):
            return self.data.size  # an image in memory, decoded already
        with Image.open(self.path if self.path is not None else io.BytesIO(self.data)) as im:
            size = im.size
            end = _ENDS.get(im.format or "")
            if end is not None and not end(*self._edges()):
                im.load()  # raises "image file is truncated" (or the decoder's error) where it was cut short
        return size

    def _edges(self) -> tuple[bytes, bytes, int]:
        """The first 12 and last 12 bytes of the encoded image, and its length in bytes."""
        if self.path is None:
            return bytes(self.data[:12]), bytes(self.data[-12:]), len(self.data)
        with open(self.path, "rb") as f:
            head = f.read(12)
            length = os.fstat(f.fileno()).st_size
            f.seek(max(0, length - 12))
            return head, f.read(), length

    def size(self) -> tuple[int, int]:
        """(width, height) from the header only."""
        from PIL import Image

        if self.known_size is not None:
            return self.known_size
        if self.path is not None:
            with Image.open(self.path) as im:
                return im.size
        if isinstance(self.data, bytes | bytearray):
            with Image.open(io.BytesIO(self.data)) as im:
                return im.size
        return self.data.size

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory image>"


#: How a whole file of a format ends, from (first 12 bytes, last 12 bytes, length): JPEG's end-of-image marker,
#: PNG's IEND chunk, GIF's trailer, the length WebP's RIFF header or BMP's header gives. Formats not listed (TIFF,
#: ...) are not checked here.
_ENDS = {
    "JPEG": lambda head, tail, n: tail.endswith(b"\xff\xd9"),
    "MPO": lambda head, tail, n: tail.endswith(b"\xff\xd9"),
    "PNG": lambda head, tail, n: tail.endswith(b"IEND\xaeB`\x82"),
    "GIF": lambda head, tail, n: tail.endswith(b";"),
    "WEBP": lambda head, tail, n: n >= 8 + int.from_bytes(head[4:8], "little"),
    "BMP": lambda head, tail, n: n >= int.from_bytes(head[2:6], "little"),
}


def open_images(record_id: str, source: str, images: tuple[Any, ...]) -> list[Any]:
    """A record's images as RGB ``PIL.Image``s (``ImageRef``s decoded now, images decoded already kept);
    ``DataError`` naming the record and the image that does not decode (a file cut short or damaged after
    ``read_records`` checked it, or one whose damage its checks cannot see)."""
    out = []
    for ref in images:
        if not isinstance(ref, ImageRef):
            out.append(ref)
            continue
        try:
            out.append(ref.open())
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... for a damaged file
            text = " ".join(str(e).split())
            raise DataError(
                f"record {record_id!r} ({source}): cannot decode image {ref}: {type(e).__name__}: {text}"
            ) from None
    return out


@dataclass(frozen=True)
class Record:
    """One conversation: ``messages`` in the HF chat format, its images in order of use."""

    id: str
    messages: list[dict[str, Any]]
    images: tuple[ImageRef, ...] = ()
    category: str | None = None
    source: str = ""


@dataclass
class RecordSet:
    records: list[Record] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (id, source, reason)


def last_assistant_text(record: Record) -> str:
    """The text of the record's last assistant turn (the reference answer in evaluation)."""
    for message in reversed(record.messages):
        if message["role"] == "assistant":
            return "".join(p["text"] for p in message["content"] if p["type"] == "text").strip()
    raise DataError(f"record {record.id!r} ({record.source}): no assistant turn")


def prompt_messages(record: Record) -> list[dict[str, Any]]:
    """The conversation up to (not including) its last assistant turn: what a model is asked."""
    last = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
    return record.messages[:last]


# --- reading files --------------------------------------------------------------------------------------


def read_records(
    path: str | os.PathLike,
    *,
    image_folder: str | os.PathLike | None = None,
    on_bad: Literal["error", "skip"] = "error",
    check_images: bool = True,
) -> RecordSet:
    """Reads and checks every record of ``path`` (module doc for the formats).

    Args:
        path: a .json / .jsonl / .parquet file or a ``save_to_disk`` directory.
        image_folder: root of relative image paths (default: the data file's folder).
        on_bad: ``"error"`` raises ``DataError`` at the first bad record; ``"skip"`` skips and counts.
        check_images: open each image file's header (existence and readability).
    """
    check_choice("on_bad", on_bad, ("error", "skip"))
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    root = Path(image_folder) if image_folder is not None else (path if path.is_dir() else path.parent)
    if image_folder is not None and not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    out = RecordSet()
    sizes: dict[Path, tuple[int, int]] = {}  # image files shared by several records are read once
    for where, raw in _raw_records(path):
        rid = str(raw.get("id", "?")) if isinstance(raw, dict) else "?"
        try:
            out.records.append(_record(raw, where, root, check_images, sizes))
        except DataError as e:
            if on_bad == "error":
                raise
            out.skipped.append((rid, where, str(e)))
    if not out.records and not out.skipped:
        raise DataError(f"{path}: no records")
    return out


def _raw_records(path: Path) -> Iterator[tuple[str, Any]]:
    if path.is_dir():
        yield from _datasets_rows(path)
        return
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _datasets_rows(path)
        return
    text = _utf8_text(path)
    stripped = text.lstrip()
    if suffix != ".jsonl" and stripped.startswith("{"):
        # one JSON object (a record, or a wrapper such as ``{"data": [...]}``), else JSONL (it fails at line 2)
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            if not {"conversations", "messages"} & whole.keys():
                keys = ", ".join(repr(k) for k in list(whole)[:5]) + (", ..." if len(whole) > 5 else "")
                raise DataError(
                    f"{path} must hold a JSON list of records (or JSONL: one record a line), got a JSON "
                    f"object with keys {keys or 'none'}"
                )
            yield str(path), whole
            return
    if suffix == ".jsonl" or stripped.startswith("{"):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise DataError(
            f"{path} must hold a JSON list of records (or JSONL: one record a line), got {type(data).__name__}"
        )
    for i, raw in enumerate(data):
        yield f"{path}[{i}]", raw


def _utf8_text(path: Path) -> str:
    """The file's text; ``DataError`` naming the first byte that is not UTF-8 (a UTF-8 BOM is allowed)."""
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start  # the position in the file
        line = raw.count(b"\n", 0, at) + 1
        raise DataError(
            f"{path} must be UTF-8 text, got byte 0x{raw[at]:02x} at position {at} (line {line}), which is "
            "not UTF-8; convert the file (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _datasets_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if len(ds) != 1:
                    raise DataError(
                        f"{path}: a DatasetDict with splits {list(ds)}; give one split's directory"
                    )
                ds = next(iter(ds.values()))
        else:
            ds = datasets.Dataset.from_parquet(str(path))
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot read it as a dataset ({e})") from None
    for i, row in enumerate(ds):
        yield f"{path}[{i}]", row


# --- one record ---------------------------------------------------------------------------------------


def _record(raw: Any, where: str, root: Path, check_images: bool, sizes: dict) -> Record:
    if not isinstance(raw, dict):
        raise DataError(f"{where} must be a record (a JSON object), got {type(raw).__name__}")
    rid = str(raw.get("id", where))

    def bad(reason: str) -> DataError:
        return DataError(f"record {rid!r} ({where}): {reason}")

    if "conversations" in raw:
        messages, images = _from_llava(raw, bad)
    elif "messages" in raw:
        messages, images = _from_messages(raw, bad)
    else:
        raise bad("no 'conversations' (LLaVA format) or 'messages' (messages format)")
    _check_roles(messages, bad)
    markers = sum(1 for m in messages for p in m["content"] if p["type"] == "image")
    if markers != len(images):
        raise bad(f"{markers} image marker(s) in the conversation but {len(images)} image(s)")
    refs = tuple(_image_ref(x, root, bad) for x in images)
    if check_images:
        checked = []
        for ref in refs:
            size = sizes.get(ref.path) if ref.path is not None else None
            if size is None:
                try:
                    size = ref.check()
                except Exception as e:  # PIL raises several types for unreadable files
                    raise bad(f"cannot read image {ref}: {e}") from None
                if ref.path is not None:
                    sizes[ref.path] = size
            w, h = size
            if w < 1 or h < 1:
                raise bad(f"image {ref} is empty ({w}x{h})")
            checked.append(dataclasses.replace(ref, known_size=size))
        refs = tuple(checked)
    category = raw.get("category")
    return Record(
        id=rid,
        messages=messages,
        images=refs,
        category=None if category is None else str(category),
        source=where,
    )


def _text_parts(text: str) -> list[dict[str, Any]]:
    """Splits LLaVA text at ``<image>`` markers into text and image parts (the marker's newline goes too)."""
    parts: list[dict[str, Any]] = []
    pieces = text.split(IMAGE_MARKER)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
            if piece.startswith("\n"):
                piece = piece[1:]
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _from_llava(raw: dict, bad) -> tuple[list[dict[str, Any]], list[Any]]:
    conv = raw["conversations"]
    if not isinstance(conv, list) or not conv:
        raise bad("'conversations' must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise bad(f"conversations[{i}] must have 'from' and 'value'")
        role = _LLAVA_ROLES.get(turn["from"])
        if role is None:
            raise bad(f"conversations[{i}].from must be human, gpt or system, got {turn['from']!r}")
        if not isinstance(turn["value"], str):
            raise bad(f"conversations[{i}].value must be a string, got {type(turn['value']).__name__}")
        messages.append({"role": role, "content": _text_parts(turn["value"])})
    image = raw.get("image")
    images = [] if image is None else ([image] if isinstance(image, str) else image)
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise bad(f"'image' must be a path or a list of paths, got {image!r}")
    markers = sum(1 for m in messages for p in m["content"] if p["type"] == "image")
    if images and markers == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise bad("images but no user turn to put them in")
        first_user["content"] = [{"type": "image"} for _ in images] + first_user["content"]
    return messages, images


def _from_messages(raw: dict, bad) -> tuple[list[dict[str, Any]], list[Any]]:
    msgs = raw["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise bad(f"messages[{i}] must have 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise bad(f"messages[{i}].role must be system, user or assistant, got {m['role']!r}")
        content = m["content"]
        if isinstance(content, str):
            parts = _text_parts(content)
        elif isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text" and isinstance(p.get("text"), str):
                    parts.append({"type": "text", "text": p["text"]})
                elif kind == "image":
                    parts.append({"type": "image"})
                else:
                    raise bad(f"messages[{i}].content[{j}] must be a text or image part, got {p!r}")
        else:
            raise bad(f"messages[{i}].content must be a string or a list of parts")
        messages.append({"role": m["role"], "content": parts})
    images = raw.get("images") or []
    if not isinstance(images, list):
        images = [images]
    return messages, images


def _check_roles(messages: list[dict[str, Any]], bad) -> None:
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles and roles[0] == "system" else roles
    if not body or body[0] != "user":
        raise bad(
            f"the conversation must start with a user turn (after an optional system turn), got {roles}"
        )
    for i, role in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise bad(f"turns must alternate user/assistant, got {roles}")
    if "assistant" not in body:
        raise bad("no assistant turn")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not "".join(p.get("text", "") for p in m["content"]).strip():
            raise bad(f"turn {i} (assistant) is empty: there is nothing to learn or to score against")
    for m in messages:
        if m["role"] != "user" and any(p["type"] == "image" for p in m["content"]):
            raise bad(f"an image in a {m['role']} turn; images belong to user turns")


def _image_ref(x: Any, root: Path, bad) -> ImageRef:
    if isinstance(x, str | os.PathLike):
        p = Path(x)
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise bad(f"image file not found: {p}")
        return ImageRef(path=p)
    if isinstance(x, dict):  # datasets' Image feature without decoding: {"bytes", "path"}
        if x.get("bytes"):
            return ImageRef(data=x["bytes"])
        if x.get("path"):
            return _image_ref(x["path"], root, bad)
        raise bad(f"image entry without bytes or path: {x!r}")
    if hasattr(x, "convert") and hasattr(x, "size"):  # a PIL image (datasets decodes Image columns)
        return ImageRef(data=x)
    raise bad(f"unsupported image entry of type {type(x).__name__}")
