"""Batching follows the processor (images per sample, the processor's own expansion of each placeholder), and
the dry run that ``train_stage`` does before the Trainer starts."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from moevl.data import ConversationCollator, ConversationDataset, DataError, read_records
from moevl.data.dryrun import dry_run, dry_run_indices
from moevl.data.labels import label_mask, label_mask_by_offsets
from moevl.data.processing import ProcessorCall
from moevl.vlm.compare import demo_config
from moevl.vlm.train import train_stage
from tests.fixtures.checkpoints import FAMILIES, build_checkpoint
from tests.fixtures.demo import TINY


def _examples(processor, llava_file):
    dataset = ConversationDataset(read_records(llava_file).records, processor, progress=False)
    return dataset, [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "paligemma"])
def test_mask_from_the_processors_replacements_equals_the_alignment_reference(
    checkpoints, llava_file, family
):
    """Two independent ways to find the assistant tokens in the processor's row: from the text the processor
    tokenized (its placeholder replacements), and by aligning the row with the unexpanded text's tokens.
    (PaliGemma's processor writes a BOS and a "\n" beyond its replacements: only the alignment applies, checked
    against its own ``suffix`` call in ``test_paligemma_rows_equal_its_own_prefix_suffix_call``.)"""
    processor = AutoProcessor.from_pretrained(checkpoints[family])
    _, examples = _examples(processor, llava_file)
    call = ProcessorCall(processor)
    texts = [e.text for e in examples]
    batch = call(texts, [list(e.images) for e in examples])
    plain = processor.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    vision = ConversationCollator(processor).vision
    for b, e in enumerate(examples):
        row, n = batch["input_ids"][b].tolist(), int(batch["attention_mask"][b].sum())
        by_offsets = label_mask_by_offsets(
            row, n, e.text, batch["text_replacement_offsets"][b], e.spans, processor.tokenizer
        )
        reference = label_mask(
            row, n, e.text, plain["input_ids"][b], plain["offset_mapping"][b], e.spans, vision
        )
        assert by_offsets is not None and by_offsets == reference
        assert sum(reference) > 0


@pytest.mark.parametrize("family", ["gemma3", "idefics3"])
def test_images_go_per_sample_and_the_processor_expands_them(checkpoints, llava_file, family):
    """Gemma 3 refuses a flat image list; Gemma 3's and Idefics3's placeholders expand into more than image tokens
    (newlines, ``<start_of_image>``, ``<fake_token_around_image>``, ``<row_1_col_1>``, ``<global-img>``)."""
    processor = AutoProcessor.from_pretrained(checkpoints[family])
    _, examples = _examples(processor, llava_file)
    images = [list(e.images) for e in examples]
    flat = [img for row in images for img in row]
    if family == "gemma3":  # (Idefics3 splits a flat list by the placeholders itself)
        with pytest.raises(ValueError, match="number of"):
            processor(text=[e.text for e in examples], images=flat, padding=True, return_tensors="pt")
    collator = ConversationCollator(processor)
    batch = collator(examples)
    assert collator.call.nested is True
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(tok.image_token if family == "gemma3" else "<image>")
    marks = [
        tok.convert_tokens_to_ids(t) for t in ("<end_of_image>", "<fake_token_around_image>", "<global-img>")
    ]
    marks = [m for m in marks if m != tok.unk_token_id]
    for b, e in enumerate(examples):
        row = batch["input_ids"][b]
        assert int((row == image_id).sum()) > 0 if e.images else int((row == image_id).sum()) == 0
        assert all(int((row == m).sum()) >= len(e.images) for m in marks)
        assert not torch.isin(batch["labels"][b], torch.tensor([image_id, *marks])).any()


class _FlatOnly:
    """A processor that takes images as one flat list only (as older processors did)."""

    def __init__(self, processor):
        self.inner = processor
        self.tokenizer = processor.tokenizer
        self.image_token = processor.image_token

    def __call__(self, *, images=None, **kwargs):
        if images is not None and isinstance(images[0], list):
            raise ValueError("nested image lists are not supported")
        return self.inner(images=images, **kwargs)


def test_a_processor_that_refuses_nested_images_gets_them_flat(checkpoints, llava_file):
    processor = AutoProcessor.from_pretrained(checkpoints["llava"])
    _, examples = _examples(processor, llava_file)
    texts, images = [e.text for e in examples], [list(e.images) for e in examples]
    call = ProcessorCall(_FlatOnly(processor))
    got = call(texts, images)
    assert call.nested is False
    expected = processor(
        text=texts,
        images=[i for row in images for i in row],
        padding=True,
        return_tensors="pt",
        add_special_tokens=False,
    )
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["pixel_values"], expected["pixel_values"])


def test_dry_run_picks_the_first_two_the_longest_and_one_of_each_kind():
    assert dry_run_indices([5, 3, 9, 9]) == [0, 1, 2]
    assert dry_run_indices([9, 3, 2]) == [0, 1]
    assert dry_run_indices([4]) == [0] and dry_run_indices([]) == []
    # and the first record of each kind: with images, without
    assert dry_run_indices([5, 3, 9, 1, 2], [True, True, True, False, False]) == [0, 1, 2, 3]
    assert dry_run_indices([5, 3, 9, 1], [False, False, False, True]) == [0, 1, 2, 3]


def test_dry_run_names_the_record_the_family_and_what_differs(checkpoints, llava_file):
    processor = AutoProcessor.from_pretrained(checkpoints["llava"])
    model = AutoModelForImageTextToText.from_pretrained(checkpoints["llava"])
    dataset, _ = _examples(processor, llava_file)
    model.train()
    model.model.vision_tower.eval()  # a frozen part kept in eval mode: the dry run restores each module's mode
    modes = {name: m.training for name, m in model.named_modules()}
    state = torch.random.get_rng_state()
    dry_run(model, dataset)  # passes
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert torch.equal(torch.random.get_rng_state(), state)

    dataset.lengths[1] += 1  # a wrong token count (what Idefics3's was before the processor counted it)
    with pytest.raises(
        DataError,
        match=r"dry run \(llava\): record 'two-images': measured 17 tokens but the processor made 16",
    ):
        dry_run(model, dataset)
    dataset.lengths[1] -= 1

    other = AutoModelForImageTextToText.from_pretrained(checkpoints["idefics3"])  # not the processor's family
    with pytest.raises(
        DataError, match=r"dry run \(idefics3\): record 'multi': the model's forward failed"
    ) as e:
        dry_run(other, dataset)
    assert "\n" not in str(e.value)
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_train_stage_stops_at_the_dry_run_before_writing_anything(tmp_path, llava_file):
    """A checkpoint whose model does not match its processor (its image token id points elsewhere) fails the
    dry run with the record named, and --out is never created."""
    ckpt = build_checkpoint("llava", tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["image_token_id"] = 3  # </s>: the image features have nowhere to go
    (ckpt / "config.json").write_text(json.dumps(config))
    cfg = demo_config(TINY, ["stage2.training.max_steps=1"])
    out = tmp_path / "s2"
    with pytest.raises(DataError, match=r"dry run \(llava\): record 'multi': the model's forward failed"):
        train_stage(
            cfg, stage=2, model=ckpt, output_dir=out, data=llava_file, image_folder=llava_file.parent,
            progress=False, log=lambda *_: None,
        )  # fmt: skip
    assert not out.exists()


@pytest.mark.parametrize("family", ["llava_next", "idefics3"])
def test_record_lengths_are_the_processors_rows_at_many_image_sizes(checkpoints, tmp_path, family):
    """After ``FAST_CHECKS`` sizes the processor's closed-form count is used where it agreed with the processor
    (LLaVA-NeXT: the count depends on the size); where it did not (Idefics3), every size is run. Either way
    each length is the processor's row."""
    from tests.fixtures.records import write_images

    sizes = ((16, 16), (20, 12), (12, 24), (32, 16), (16, 32), (40, 8), (24, 24))
    names = write_images(tmp_path, sizes)
    records = [
        {"id": f"r{i}", "image": n, "conversations": [{"from": "human", "value": "<image>\nwhat is it"},
                                                      {"from": "gpt", "value": "a cat"}]}
        for i, n in enumerate(names)
    ]  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps(records))
    processor = AutoProcessor.from_pretrained(checkpoints[family])
    calls = []
    original = ProcessorCall.__call__

    def counted(self, texts, images, **kw):
        calls.append(len(texts))
        return original(self, texts, images, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ProcessorCall, "__call__", counted)
        dataset = ConversationDataset(read_records(tmp_path / "data.json").records, processor, progress=False)
    probes = len(calls)
    batch = ConversationCollator(processor)([dataset[i] for i in range(len(dataset))])
    assert dataset.lengths == batch["attention_mask"].sum(1).tolist()
    fast = family == "llava_next"
    assert probes == (3 if fast else len(sizes))  # one processor run a size until the closed form is trusted


def test_paligemma_rows_equal_its_own_prefix_suffix_call(checkpoints, tmp_path):
    """PaliGemma is a prefix LM: its processor, given the prompt and the answer as ``suffix``, writes
    ``<image>*n<bos>prompt\\n answer<eos>`` with ``token_type_ids`` 1 on the answer (causal) and 0 on the prompt
    (attended both ways), and labels on the answer. The collator, given the whole rendered conversation, must
    make the same row (its processor adds one "\\n" after the text, past the end, never learnt)."""
    from PIL import Image

    processor = AutoProcessor.from_pretrained(checkpoints["paligemma"])
    Image.new("RGB", (20, 12), (200, 30, 30)).save(tmp_path / "im.png")
    pairs = [("what is in the image", "a red cat"), ("how many", "two")]
    raw = [
        {"id": str(i), "image": "im.png", "conversations": [
            {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
        for i, (q, a) in enumerate(pairs)
    ]  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps(raw))
    records = read_records(tmp_path / "data.json").records
    dataset = ConversationDataset(records, processor, progress=False)
    batch = ConversationCollator(processor)([dataset[i] for i in range(len(dataset))])
    own = processor(
        text=[f"<image>{q}" for q, _ in pairs],
        suffix=[a for _, a in pairs],
        images=[[Image.open(tmp_path / "im.png")] for _ in pairs],
        padding=True,
        return_tensors="pt",
    )
    for b in range(len(pairs)):
        n = int(own["attention_mask"][b].sum())
        assert int(batch["attention_mask"][b].sum()) == n + 1 == dataset.lengths[b]
        assert processor.tokenizer.decode(batch["input_ids"][b, n : n + 1]) == "\n"
        for key in ("input_ids", "token_type_ids", "labels", "attention_mask"):
            assert batch[key][b, :n].tolist() == own[key][b, :n].tolist(), key
        assert batch["labels"][b, n] == -100
    torch.testing.assert_close(batch["pixel_values"], own["pixel_values"])


def test_a_record_the_processor_cannot_take_stops_the_dry_run_with_nothing_written(
    checkpoints, llava_file, tmp_path
):
    """PaliGemma's processor needs an image in every sample (in a batch with others it would insert its BOS in
    the middle of a text-only record's words): the dry run takes a record without images alone and names it."""
    cfg = demo_config(TINY, ["stage2.training.max_steps=2"])
    with pytest.raises(DataError, match=r"dry run \(paligemma\): record 'text': .*`images` are expected"):
        train_stage(
            cfg, stage=2, model=checkpoints["paligemma"], output_dir=tmp_path / "out", data=llava_file,
            image_folder=llava_file.parent, progress=False, log=lambda *_: None,
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_no_family_is_taken_for_a_text_only_checkpoint(checkpoints):
    from moevl.vlm.io import check_model_dir

    for family, path in checkpoints.items():
        assert check_model_dir(path) == path, family
