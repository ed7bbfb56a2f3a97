import json

import pytest
from PIL import Image

from moevl.data import DataError, read_records
from moevl.data.conversations import last_assistant_text, prompt_messages
from tests.fixtures.records import LLAVA_RECORDS, write_images

TEXT = lambda t: {"type": "text", "text": t}  # noqa: E731
IMAGE = {"type": "image"}


def test_llava_json_multi_turn_several_images_and_text_only(llava_file):
    rs = read_records(llava_file)
    multi, two, text = rs.records
    assert multi.messages == [
        {"role": "user", "content": [IMAGE, TEXT("what is in the image")]},
        {"role": "assistant", "content": [TEXT("a cat")]},
        {"role": "user", "content": [TEXT("how many")]},
        {"role": "assistant", "content": [TEXT("two")]},
    ]
    assert multi.category == "what" and multi.images[0].path == llava_file.parent / "im0.png"
    assert two.messages[0]["content"] == [IMAGE, IMAGE, TEXT("describe it")]
    assert [r.path.name for r in two.images] == ["im1.png", "im2.png"]
    assert text.images == () and text.category is None
    assert last_assistant_text(multi) == "two" and prompt_messages(multi) == multi.messages[:3]
    assert multi.source == f"{llava_file}[0]"


def test_jsonl_and_image_folder(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    write_images(images)
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in LLAVA_RECORDS) + "\n")
    rs = read_records(path, image_folder=images)
    assert [r.id for r in rs.records] == ["multi", "two-images", "text"]
    assert rs.records[0].source == f"{path}:1"


def test_images_without_marker_go_before_the_first_user_text(tmp_path):
    write_images(tmp_path)
    rec = {
        "id": "x",
        "image": "im0.png",
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
    }
    (tmp_path / "d.json").write_text(json.dumps([rec]))
    (r,) = read_records(tmp_path / "d.json").records
    assert r.messages[0]["content"] == [IMAGE, TEXT("hi")]


def _messages_rows(folder):
    return [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": "what is in the image"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "a dog"}]},
            ],
            "images": [str(folder / "im0.png")],
        },
        {
            "messages": [{"role": "user", "content": "yes or no"}, {"role": "assistant", "content": "yes"}],
            "images": [],
        },
    ]


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "save_to_disk"])
def test_messages_format(tmp_path, kind):
    import datasets

    write_images(tmp_path)
    rows = _messages_rows(tmp_path)
    if kind == "json":
        path = tmp_path / "m.json"
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        path = tmp_path / "m.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        # an Image column, as TRL's datasets have it (stored as bytes)
        feats = datasets.Features(
            {
                "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
                "images": datasets.Sequence(datasets.Image()),
            }
        )
        flat = [
            {
                "messages": [
                    {"role": "user", "content": "<image>what is in the image"},
                    {"role": "assistant", "content": "a dog"},
                ],
                "images": [str(tmp_path / "im0.png")],
            },
            {
                "messages": [
                    {"role": "user", "content": "yes or no"},
                    {"role": "assistant", "content": "yes"},
                ],
                "images": [],
            },
        ]
        ds = datasets.Dataset.from_list(flat, features=feats)
        if kind == "parquet":
            path = tmp_path / "m.parquet"
            ds.to_parquet(str(path))
        else:
            path = tmp_path / "m_ds"
            ds.save_to_disk(str(path))
    first, second = read_records(path).records
    assert first.messages[0]["content"] == [IMAGE, TEXT("what is in the image")]
    assert last_assistant_text(first) == "a dog" and len(first.images) == 1
    assert first.images[0].open().size == Image.open(tmp_path / "im0.png").size
    assert second.images == () and last_assistant_text(second) == "yes"


BAD = [
    (
        {
            "id": "r1",
            "image": "missing.png",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
        },
        "image file not found",
    ),
    (
        {
            "id": "r2",
            "image": "broken.png",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
        },
        "cannot read image",
    ),
    ({"id": "r3", "conversations": []}, "non-empty list"),
    ({"id": "r4", "conversations": [{"from": "gpt", "value": "a"}]}, "must start with a user turn"),
    (
        {"id": "r5", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]},
        "alternate",
    ),
    ({"id": "r6", "conversations": [{"from": "human", "value": "q"}]}, "no assistant turn"),
    (
        {"id": "r6b", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]},
        "turn 1 (assistant) is empty",
    ),
    (
        {
            "id": "r7",
            "image": "im0.png",
            "conversations": [{"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}],
        },
        "2 image marker(s) in the conversation but 1 image(s)",
    ),
    ({"id": "r8", "conversations": [{"from": "bot", "value": "q"}]}, "must be human, gpt or system"),
    ({"id": "r9", "text": "no conversation"}, "no 'conversations'"),
    (
        {
            "id": "r10",
            "image": "im0.png",
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>a"}],
        },
        "an image in a assistant turn",
    ),
]


@pytest.mark.parametrize(("record", "message"), BAD, ids=[r["id"] for r, _ in BAD])
def test_bad_record_fails_fast_naming_id_and_file(tmp_path, record, message):
    write_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = tmp_path / "d.json"
    path.write_text(json.dumps([LLAVA_RECORDS[2], record]))
    with pytest.raises(DataError) as err:
        read_records(path)
    assert (
        message in str(err.value) and f"'{record['id']}'" in str(err.value) and f"{path}[1]" in str(err.value)
    )
    rs = read_records(path, on_bad="skip")
    assert [r.id for r in rs.records] == ["text"]
    assert len(rs.skipped) == 1 and rs.skipped[0][0] == record["id"] and message in rs.skipped[0][2]


def test_malformed_files(tmp_path):
    (tmp_path / "a.json").write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        read_records(tmp_path / "a.json")
    (tmp_path / "b.jsonl").write_text(json.dumps(LLAVA_RECORDS[2]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"b.jsonl:2: not valid JSON"):
        read_records(tmp_path / "b.jsonl")
    (tmp_path / "d.json").write_text('[{"id": "x', encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_records(tmp_path / "d.json")
    assert "Unterminated string starting at: line 1 column 9" in str(err.value) and "at at" not in str(
        err.value
    )
    (tmp_path / "c.json").write_text('"text"')
    with pytest.raises(DataError, match="must hold a JSON list"):
        read_records(tmp_path / "c.json")
    with pytest.raises(DataError, match="data file not found"):
        read_records(tmp_path / "none.json")
    with pytest.raises(DataError, match="image folder not found"):
        read_records(tmp_path / "c.json", image_folder=tmp_path / "nope")


def test_a_file_that_is_not_utf8_is_named_with_the_byte_and_its_position(tmp_path):
    record = {
        "id": "latin",
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "café"}],
    }
    for name, text, line in (
        ("a.json", json.dumps([LLAVA_RECORDS[2], record], ensure_ascii=False), 1),
        ("b.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in (LLAVA_RECORDS[2], record)), 2),
    ):
        path = tmp_path / name
        path.write_bytes(text.encode("latin-1"))
        at = path.read_bytes().index(b"\xe9")
        with pytest.raises(DataError) as err:
            read_records(path)
        assert str(err.value) == (
            f"{path} must be UTF-8 text, got byte 0xe9 at position {at} (line {line}), which is not UTF-8; "
            "convert the file (e.g. iconv -f latin1 -t utf-8)"
        )
    # a UTF-8 byte-order mark is no error, and the position counts it
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([record], ensure_ascii=False).encode("utf-8"))
    assert last_assistant_text(read_records(path).records[0]) == "café"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([record], ensure_ascii=False).encode("latin-1"))
    at = path.read_bytes().index(b"\xe9")
    with pytest.raises(DataError, match=f"at position {at} "):
        read_records(path)


@pytest.mark.parametrize("indent", [None, 1])
def test_a_json_object_that_is_not_a_record_asks_for_a_list(tmp_path, indent):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": LLAVA_RECORDS[2:]}, indent=indent))
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (
        f"{path} must hold a JSON list of records (or JSONL: one record a line), got a JSON object with keys 'data'"
    )
    path.write_text(json.dumps(LLAVA_RECORDS[2], indent=indent))  # one record alone is still read as one
    assert [r.id for r in read_records(path).records] == ["text"]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP"])
def test_an_image_cut_short_is_a_bad_record_before_anything_trains(tmp_path, fmt):
    # the header alone reads fine: this one failed in the collator, mid-training ("image file is truncated")
    import numpy as np

    pixels = (np.random.default_rng(0).random((24, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "whole", format=fmt)
    data = (tmp_path / "whole").read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "trailing").write_bytes(data + b"bytes after the end")  # decodes: not an error
    records = [
        {
            "id": name,
            "image": name,
            "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}],
        }
        for name in ("whole", "cut", "trailing")
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value).startswith(f"record 'cut' ({path}[1]): cannot read image {tmp_path / 'cut'}: ")
    rs = read_records(path, on_bad="skip")
    assert [r.id for r in rs.records] == ["whole", "trailing"] and [s[0] for s in rs.skipped] == ["cut"]
    assert rs.records[1].images[0].known_size == (32, 24)
