import gzip

import numpy as np
import pytest
import torch

from moevl.data import ConversationCollator, ConversationDataset, read_records
from moevl.data.conversations import last_assistant_text
from moevl.data.digits import BenchmarkConfig, build_benchmark, write_digit_benchmark
from moevl.data.images import load_fashion_mnist_source
from moevl.data.scenes import FAMILIES, ask, caption, vocabulary

SMALL = BenchmarkConfig(train_scenes=35, validation_scenes=10, test_scenes=10, caption_scenes=10)


@pytest.fixture(scope="module")
def bench():
    return build_benchmark(SMALL)


def test_deterministic_given_seed(bench):
    again = build_benchmark(SMALL)
    for split in ("train", "validation", "test"):
        a = [(e.question.text, e.question.answer, e.scene.image_ids.tolist()) for e in bench.questions[split]]
        b = [(e.question.text, e.question.answer, e.scene.image_ids.tolist()) for e in again.questions[split]]
        assert a == b
    other = build_benchmark(BenchmarkConfig(**{**SMALL.__dict__, "seed": 1}))
    assert [e.question.text for e in other.questions["train"]] != [
        e.question.text for e in bench.questions["train"]
    ]


def test_splits_use_disjoint_images(bench):
    pools = {k: set(v.tolist()) for k, v in bench.pools.items()}
    assert not pools["train"] & pools["validation"]
    assert not pools["train"] & pools["test"]
    assert not pools["validation"] & pools["test"]
    for split, examples in bench.questions.items():
        used = {int(i) for e in examples for i in e.scene.image_ids.ravel() if i >= 0}
        assert used <= pools[split]
    assert {int(i) for s in bench.captions for i in s.image_ids.ravel() if i >= 0} <= pools["train"]


def test_answers_are_correct(bench):
    rng = np.random.default_rng(0)
    scene = bench.questions["train"][0].scene
    labels = scene.labels
    for _ in range(50):
        q = ask(rng, scene, "count", bench.source)
        digit = int(q.text.split()[-1])
        assert q.answer == str(int((labels == digit).sum()))
        q = ask(rng, scene, "sum", bench.source)
        words = q.text.split()
        line_word, axis = words[-2], words[-1]
        names = ("top", "middle", "bottom") if axis == "row" else ("left", "middle", "right")
        i = names.index(line_word)
        line = labels[i] if axis == "row" else labels[:, i]
        assert q.answer == str(int(np.where(line >= 0, line, 0).sum()))
    # The caption lists the cells in reading order.
    assert caption(scene, bench.source).split() == [str(v) if v >= 0 else "empty" for v in labels.ravel()]


def _inverted_reference(text: str, labels: np.ndarray) -> str:
    """The answer of an inverted question computed on the scene as it is: each class c counts as 9 - c."""
    from moevl.data.scenes import cell_words

    words = text.split()
    assert words[0] == "inverted"
    inv = np.where(labels >= 0, 9 - labels, -1)
    flat = inv.ravel()
    g = labels.shape[0]
    if words[1:3] == ["what", "digit"]:  # position
        v = int(flat[cell_words(g).index(" ".join(words[6:]))])
        return str(v) if v >= 0 else "empty"
    if words[1] == "how":  # count
        return str(int((flat == int(words[-1])).sum()))
    if words[1] == "is":  # exists
        return "yes" if (flat == int(words[-1])).any() else "no"
    names = {"row": ("top", "middle", "bottom"), "column": ("left", "middle", "right")}

    def line_sum(name: str, axis: str) -> int:
        i = names[axis].index(name)
        line = inv[i] if axis == "row" else inv[:, i]
        return int(np.where(line >= 0, line, 0).sum())

    if words[1] == "what":  # sum
        return str(line_sum(words[-2], words[-1]))
    a, b = line_sum(words[6], words[7]), line_sum(words[10], words[11])  # compare
    return words[6] if a > b else words[10] if b > a else "same"


def test_inverted_questions_read_every_class_as_nine_minus_it():
    config = BenchmarkConfig(**{**SMALL.__dict__, "inverted_share": 0.5})
    inverted = build_benchmark(config)
    vocab = set(vocabulary(inverted.source, config.grid))
    for split, examples in inverted.questions.items():
        flags = [e.question.text.startswith("inverted ") for e in examples]
        assert 0.3 < sum(flags) / len(flags) < 0.7, split
        for e, flag in zip(examples, flags, strict=True):
            assert set(e.question.text.split()) | {e.question.answer} <= vocab
            if flag:
                assert e.question.answer == _inverted_reference(e.question.text, e.scene.labels), e.question
    families = {e.question.family for e in inverted.questions["train"] if e.question.text.startswith("inv")}
    assert families == set(FAMILIES)


def test_negated_exists_questions_have_the_opposite_answer_and_leave_other_families_alone():
    config = BenchmarkConfig(**{**SMALL.__dict__, "negated_share": 0.3})
    negated = build_benchmark(config)
    vocab = set(vocabulary(negated.source, config.grid))
    share = []
    for examples in negated.questions.values():
        exists = [e for e in examples if e.question.family == "exists"]
        flags = [e.question.text.startswith("is there no ") for e in exists]
        share += flags
        for e, flag in zip(exists, flags, strict=True):
            c = int(e.question.text.split()[-1])
            present = bool((e.scene.labels == c).any())
            assert e.question.answer == ("no" if present == flag else "yes"), e.question
        for e in examples:
            assert set(e.question.text.split()) | {e.question.answer} <= vocab
            assert " no " not in f" {e.question.text} " or e.question.family == "exists"
    assert 0.2 < sum(share) / len(share) < 0.4  # of the "exists" questions of every split


def test_families_balanced_and_vocabulary_covers_everything(bench):
    fams = [e.question.family for e in bench.questions["train"]]
    weights = dict(zip(FAMILIES, bench.config.family_weights, strict=True))
    unit = len(fams) // sum(weights.values())
    assert {f: fams.count(f) for f in FAMILIES} == {f: unit * weights[f] for f in FAMILIES}
    fams = [e.question.family for e in bench.questions["test"]]
    assert {f: fams.count(f) for f in FAMILIES} == {f: len(fams) // len(FAMILIES) for f in FAMILIES}
    vocab = set(vocabulary(bench.source, bench.config.grid))
    for e in bench.questions["train"]:
        assert set(e.question.text.split()) | {e.question.answer} <= vocab


def test_count_answers_balanced_and_family_weights():
    cfg = BenchmarkConfig(train_scenes=400, validation_scenes=40, test_scenes=40, caption_scenes=1)
    weighted = build_benchmark(BenchmarkConfig(**{**cfg.__dict__, "family_weights": (1, 3, 1, 2, 1)}))
    fams = [e.question.family for e in weighted.questions["train"]]
    n = len(fams) // 8
    assert {f: fams.count(f) for f in FAMILIES} == dict(zip(FAMILIES, (n, 3 * n, n, 2 * n, n), strict=True))
    for split in ("validation", "test"):  # evaluation splits stay equal per family
        fams = [e.question.family for e in weighted.questions[split]]
        assert len({fams.count(f) for f in FAMILIES}) == 1
    answers = [e.question.answer for e in weighted.questions["train"] if e.question.family == "count"]
    shares = {a: answers.count(a) / len(answers) for a in set(answers)}
    assert max(shares.values()) < 0.4 and {"0", "1", "2", "3"} <= set(shares)
    exists = [e.question.answer for e in weighted.questions["train"] if e.question.family == "exists"]
    assert abs(exists.count("yes") / len(exists) - 0.5) < 0.05
    # The old generator (every class uniform, count asked of a present class half the time) gave
    # mostly "1"; it stays available.
    old = build_benchmark(BenchmarkConfig(**{**cfg.__dict__, "palette": (10, 10), "balance_answers": False}))
    answers = [e.question.answer for e in old.questions["train"] if e.question.family == "count"]
    assert answers.count("1") / len(answers) > 0.45


def test_written_benchmark_is_deterministic_and_round_trips(tmp_path):
    a = write_digit_benchmark(tmp_path / "a", SMALL)
    b = write_digit_benchmark(tmp_path / "b", SMALL)
    files_a = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.root) for p in b.root.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 40
    for rel in files_a:
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel
    bench = build_benchmark(SMALL)
    test = read_records(a.test, image_folder=a.image_folder).records
    assert len(test) == len(bench.questions["test"])
    for record, example in zip(test, bench.questions["test"], strict=True):
        assert record.category == example.question.family
        assert last_assistant_text(record) == example.question.answer
        assert record.messages[0]["content"] == [
            {"type": "image"},
            {"type": "text", "text": example.question.text},
        ]
        pixels = np.asarray(record.images[0].open().convert("L"), dtype=np.float64) / 255
        np.testing.assert_allclose(pixels, bench.render(example.scene), atol=0.5 / 255)
    instruct = read_records(a.instruct, image_folder=a.image_folder).records
    assert len(instruct) == len(bench.questions["train"]) + len(bench.captions)
    # a complete benchmark with the same config is reused as it is; another config rewrites it
    stamp = a.test.stat().st_mtime_ns
    write_digit_benchmark(a.root, SMALL)
    assert a.test.stat().st_mtime_ns == stamp
    other = write_digit_benchmark(a.root, BenchmarkConfig(**{**SMALL.__dict__, "test_scenes": 3}))
    assert (
        len(read_records(other.test, image_folder=other.image_folder).records)
        == 3 * SMALL.questions_per_scene
    )


def test_demo_checkpoint_renders_the_documented_layout(bench, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from moevl.data.images import CELL
    from moevl.vlm.checkpoint import TinyModelConfig, build_llava_checkpoint

    files = write_digit_benchmark(tmp_path / "data", SMALL)
    small = TinyModelConfig(vision_hidden_size=16, vision_heads=2, text_hidden_size=32, text_heads=2)
    out = build_llava_checkpoint(
        tmp_path / "ckpt", small, words=files.vocabulary, image_size=SMALL.grid * CELL
    )
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    records = read_records(files.test, image_folder=files.image_folder).records[:4]
    dataset = ConversationDataset(records, processor, progress=False)
    batch = ConversationCollator(processor)([dataset[i] for i in range(4)])
    tok = processor.tokenizer
    patches = (SMALL.grid * CELL // small.patch_size) ** 2
    for i, record in enumerate(records):
        n = int(batch["attention_mask"][i].sum())
        tokens = tok.convert_ids_to_tokens(batch["input_ids"][i, :n].tolist())
        question = record.messages[0]["content"][1]["text"].split()
        answer = last_assistant_text(record).split()
        assert tokens == ["<s>", *["<image>"] * patches, *question, *answer, "</s>"]
        labels = batch["labels"][i, :n]
        assert tok.convert_ids_to_tokens(labels[labels != -100].tolist()) == [*answer, "</s>"]
    assert torch.isfinite(model(**batch).loss)


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_a_local_path(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (60, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(60) % 10)
    source = load_fashion_mnist_source(tmp_path)
    assert source.images.shape == (60, 8, 8) and not source.numeric
    bench = build_benchmark(BenchmarkConfig(**{**SMALL.__dict__, "source": "fashion-mnist"}), source=source)
    assert set(bench.families) == {"position", "count", "exists"}
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST not found"):
        load_fashion_mnist_source(tmp_path / "nowhere")
