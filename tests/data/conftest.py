import json

import numpy as np
import pytest
from PIL import Image

from moevl.data import read_records
from tests.hf.checkpoints import FAMILIES, IMAGES_REQUIRED, build_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny checkpoint directories of every family, built once per session."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {f: build_checkpoint(f, root / f) for f in FAMILIES}


def write_images(folder, sizes=((16, 16), (20, 12), (12, 24))):
    rng = np.random.default_rng(0)
    names = []
    for i, (w, h) in enumerate(sizes):
        name = f"im{i}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / name)
        names.append(name)
    return names


#: multi-turn with an image, two images, text only
LLAVA_RECORDS = [
    {
        "id": "multi",
        "image": "im0.png",
        "category": "what",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat is in the image"},
            {"from": "gpt", "value": "a cat"},
            {"from": "human", "value": "how many"},
            {"from": "gpt", "value": "two"},
        ],
    },
    {
        "id": "two-images",
        "image": ["im1.png", "im2.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\ndescribe it"},
            {"from": "gpt", "value": "red and blue"},
        ],
    },
    {
        "id": "text",
        "conversations": [{"from": "human", "value": "yes or no"}, {"from": "gpt", "value": "no"}],
    },
]


@pytest.fixture
def llava_file(tmp_path):
    write_images(tmp_path)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(LLAVA_RECORDS))
    return path


def records_for(path, family):
    """The records of ``path`` a family's processor takes: PaliGemma's needs an image in every record."""
    records = read_records(path).records
    return [r for r in records if r.images] if family in IMAGES_REQUIRED else records


def file_for(path, family, folder):
    """``path``, or a copy in ``folder`` without the records ``family``'s processor cannot take."""
    if family not in IMAGES_REQUIRED:
        return path
    out = folder / f"{family}.json"
    out.write_text(json.dumps([r for r in json.loads(path.read_text()) if "image" in r]))
    return out
