import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from moevl.data import ConversationCollator, ConversationDataset, DataError, read_records
from moevl.data.generation import GenerationCollator
from moevl.data.processing import ChatRenderer, assistant_spans, vision_token_ids
from tests.fixtures.checkpoints import END_OF_TURN, FAMILIES
from tests.fixtures.records import records_for


def _reference_labels(processor, record, family) -> str:
    """The assistant replies, each followed by the family's end-of-turn token, without whitespace (word-level
    and BPE tokenizers decode spaces differently; the characters must be exactly these)."""
    eos = END_OF_TURN[family]
    replies = [
        "".join(p["text"] for p in m["content"]) + eos for m in record.messages if m["role"] == "assistant"
    ]
    return "".join("".join(replies).split())


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_exactly_the_assistant_tokens(checkpoints, llava_file, family):
    processor = AutoProcessor.from_pretrained(checkpoints[family])
    records = records_for(llava_file, family)
    dataset = ConversationDataset(records, processor, progress=False)
    batch = ConversationCollator(processor)([dataset[i] for i in range(len(dataset))])
    vision = set(vision_token_ids(processor))
    for i, record in enumerate(records):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        kept = labels[labels != -100]
        decoded = processor.tokenizer.decode(kept.tolist(), skip_special_tokens=False)
        assert "".join(decoded.split()) == _reference_labels(processor, record, family)
        assert torch.equal(kept, ids[labels != -100])  # labels are the tokens themselves
        assert not any(t in vision for t in kept.tolist())
        assert (labels[mask == 0] == -100).all()  # never on padding
        # the measured length equals the processor's row length (no pixels decoded to measure it)
        assert dataset.lengths[i] == int(mask.sum())
    # image tokens were expanded by the processor: more than the markers
    n_image = sum(int((batch["input_ids"][i] == t).sum()) for i in range(len(records)) for t in vision)
    assert n_image > 3


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_feeds_the_model_and_generation(checkpoints, llava_file, family):
    processor = AutoProcessor.from_pretrained(checkpoints[family])
    model = AutoModelForImageTextToText.from_pretrained(checkpoints[family])
    records = records_for(llava_file, family)
    dataset = ConversationDataset(records, processor, progress=False)
    batch = ConversationCollator(processor)([dataset[i] for i in range(len(dataset))])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    gen = GenerationCollator(processor)(records)
    n = len(records)
    assert (
        gen.answers == ["two", "red and blue", "no"][:n]
        and gen.prompts
        == [
            "how many",
            "describe it",
            "yes or no",
        ][:n]
    )
    ids, attention = gen.inputs["input_ids"], gen.inputs["attention_mask"]
    assert (attention[:, -1] == 1).all() and (attention[:, 0] == 0).any()  # left padded
    # the first record is asked up to its last assistant turn, which is not in the prompt
    first = ids[0][attention[0] == 1].tolist()
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("two") not in first
    asked = tok.apply_chat_template(records[0].messages[:3], tokenize=False, add_generation_prompt=True)
    asked = tok(asked, add_special_tokens=False)["input_ids"]
    tail = first[-3:] if first[-3:] == asked[-3:] else first[-4:-1]  # (PaliGemma's processor writes a "\n")
    assert tail == asked[-3:]  # ends with the generation prompt
    suppress = list(vision_token_ids(processor, model.config))
    new = model.generate(**gen.inputs, max_new_tokens=4, do_sample=False, suppress_tokens=suppress)
    assert not any(t in suppress for t in new[:, ids.shape[1] :].flatten().tolist())


def test_over_long_records_are_dropped_and_counted(checkpoints, llava_file):
    processor = AutoProcessor.from_pretrained(checkpoints["llava"])
    records = read_records(llava_file).records
    full = ConversationDataset(records, processor, progress=False)
    limit = sorted(full.lengths)[1]
    kept = ConversationDataset(records, processor, max_length=limit, progress=False)
    assert kept.dropped_too_long == sum(n > limit for n in full.lengths) == 1
    assert all(n <= limit for n in kept.lengths) and len(kept) == 2


def test_missing_chat_template_is_a_clear_error(checkpoints, llava_file):
    processor = AutoProcessor.from_pretrained(checkpoints["llava"])
    processor.chat_template = None
    processor.tokenizer.chat_template = None
    records = read_records(llava_file).records
    with pytest.raises(DataError, match="--chat-template"):
        ConversationDataset(records, processor, progress=False)
    # an override works
    template = "{% for m in messages %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %} {% endfor %}{% if m['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
    ds = ConversationDataset(records, processor, chat_template=template, progress=False)
    text, spans = assistant_spans(ChatRenderer(processor, template), records[2])
    assert [text[a:b] for a, b in spans] == ["no </s>"]  # trailing whitespace is not learnt
    assert len(ds) == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_renderer_equals_apply_chat_template(checkpoints, llava_file, family):
    processor = AutoProcessor.from_pretrained(checkpoints[family])
    tok = processor.tokenizer
    render = ChatRenderer(processor, tok.chat_template)
    assert render.compiled is not None
    for record in records_for(llava_file, family):
        for n in range(1, len(record.messages) + 1):
            for gen in (False, True):
                expected = tok.apply_chat_template(
                    record.messages[:n], tokenize=False, add_generation_prompt=gen
                )
                assert render(record.messages[:n], generation_prompt=gen) == expected


#: llava-hf/llava-1.5-7b-hf's chat template: an assistant turn is its text and a space, no end-of-turn token.
STOCK_LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.mark.parametrize(
    ("family", "stock"), [("llava", True), ("llava", False), ("llava_next", True), ("qwen2_vl", False)]
)
def test_each_assistant_turn_ends_with_exactly_one_learnt_end_token(checkpoints, llava_file, family, stock):
    """With the stock llava template (nothing after a reply) the tokenizer's EOS is appended to each turn;
    with a template that writes an end-of-turn token (``</s>``, ``<|im_end|>``) nothing is added."""
    processor = AutoProcessor.from_pretrained(checkpoints[family])
    template = STOCK_LLAVA_TEMPLATE if stock else None
    records = read_records(llava_file).records
    dataset = ConversationDataset(records, processor, chat_template=template, progress=False)
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>" if family == "qwen2_vl" else "</s>")
    assert dataset.turn_end.token_ids == (end,)
    assert (dataset.turn_end.appended is not None) == stock
    batch = ConversationCollator(processor)([dataset[i] for i in range(len(dataset))])
    for i, record in enumerate(records):
        labels = batch["labels"][i]
        turns = sum(m["role"] == "assistant" for m in record.messages)
        assert int((labels == end).sum()) == turns  # one per turn: "multi" has two
        kept = labels[labels != -100].tolist()
        assert kept[-1] == end  # the last learnt token ends the last turn
        # and each learnt run of tokens (one per turn) ends with it
        runs = torch.tensor([lab != -100 for lab in labels.tolist()]).int().diff()
        run_ends = (runs == -1).nonzero().flatten().tolist() + (
            [len(labels) - 1] if labels[-1] != -100 else []
        )
        assert [int(labels[j]) for j in run_ends] == [end] * turns


def test_invalid_or_failing_template_is_a_clear_error(checkpoints, llava_file):
    processor = AutoProcessor.from_pretrained(checkpoints["llava"])
    records = read_records(llava_file).records
    with pytest.raises(DataError, match="not valid Jinja"):
        ConversationDataset(records, processor, chat_template="{% for m in messages %}", progress=False)
    failing = "{{ raise_exception('no images here') }}"
    with pytest.raises(DataError, match=r"failed to render.*no images here"):
        ConversationDataset(records, processor, chat_template=failing, progress=False)


def test_an_image_that_fails_to_decode_in_training_is_a_bad_record(checkpoints, llava_file, tmp_path):
    """Damage read_records cannot see (here: the file cut after it was read) fails where the image is decoded:
    named, or skipped, reported and listed with on_bad="skip"; never an OSError from the collator."""
    processor = AutoProcessor.from_pretrained(checkpoints["llava"])
    records = read_records(llava_file).records
    image = llava_file.parent / "im0.png"  # record 'multi' only
    image.write_bytes(image.read_bytes()[:100])
    dataset = ConversationDataset(records, processor, progress=False)
    with pytest.raises(DataError) as err:
        dataset[0]
    assert str(err.value).startswith(
        f"record 'multi' ({llava_file}[0]): cannot decode image {image}: OSError: "
    )
    with pytest.raises(DataError, match="record 'multi'"):
        ConversationCollator(processor)([dataset.examples[0]])  # the collator given the record itself
    reported, log = [], tmp_path / "skipped.jsonl"
    dataset = ConversationDataset(
        records, processor, progress=False, on_bad="skip", skip_log=log, report=reported.append
    )
    assert dataset.fetch(0)[0] == 1 and dataset[0].id == "two-images"  # the next record takes its place
    assert len(reported) == 1 and reported[0].startswith(
        "skipped a bad record (data.skip_bad_records): record 'multi'"
    )
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["id"], r["source"]) for r in rows] == [("multi", f"{llava_file}[0]")]
    batch = ConversationCollator(processor)([dataset[i] for i in range(len(dataset))])
    assert batch["input_ids"].shape[0] == 3
    assert len(reported) == 1 and len(log.read_text().splitlines()) == 1  # skipped once, not at every visit
