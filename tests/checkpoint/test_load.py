"""``load_checkpoint`` picks the loader by the directory's format: the moevl format, a released MoE-LLaVA
checkpoint, anything else through transformers' Auto class."""

import torch

from moevl.checkpoint import save_moe_model
from moevl.checkpoint.format import is_moevl_checkpoint
from moevl.checkpoint.load import is_moe_llava_checkpoint, is_sparse_checkpoint, load_checkpoint
from moevl.hf import moe_blocks, moe_state, upcycle
from moevl.stgc import STGCConfig
from moevl.vlm.checkpoint import word_tokenizer
from tests.fixtures.checkpoints import WORDS
from tests.fixtures.moe_llava_checkpoint import NUM_EXPERTS, write_checkpoint
from tests.fixtures.tiny import tiny_llava


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_moevl_format_loads_exactly_with_overrides(tmp_path):
    model = upcycle(tiny_llava(), num_experts=4, top_k=2, stgc=STGCConfig(weight=0.3))
    save_moe_model(model, tmp_path)
    assert is_moevl_checkpoint(tmp_path) and is_sparse_checkpoint(tmp_path)
    assert not is_moe_llava_checkpoint(tmp_path)
    loaded, tokenizer = load_checkpoint(tmp_path, moe_overrides={"stgc": None})
    assert tokenizer is None and type(loaded) is type(model) and not loaded.training
    assert moe_state(loaded).settings.stgc is None and moe_state(model).settings.stgc is not None
    _same_weights(model, loaded)


def test_dense_checkpoint_loads_with_the_auto_class(tmp_path):
    model = tiny_llava()
    model.save_pretrained(tmp_path)
    assert not is_sparse_checkpoint(tmp_path) and not is_moe_llava_checkpoint(tmp_path)
    loaded, tokenizer = load_checkpoint(tmp_path, moe_overrides={"stgc": None})  # nothing to override
    assert tokenizer is None and type(loaded) is type(model) and not moe_blocks(loaded)
    _same_weights(model, loaded)


def test_moe_llava_checkpoint_loads_with_its_tokenizer(tmp_path):
    write_checkpoint(tmp_path, "phi")
    word_tokenizer(WORDS).save_pretrained(tmp_path)
    assert is_moe_llava_checkpoint(tmp_path) and is_sparse_checkpoint(tmp_path)
    assert not is_moevl_checkpoint(tmp_path)
    loaded, tokenizer = load_checkpoint(tmp_path, moe_overrides={"stgc": STGCConfig()})
    assert tokenizer is not None and "<image>" in tokenizer.get_vocab()
    assert (
        moe_state(loaded).settings.num_experts == NUM_EXPERTS
        and moe_state(loaded).settings.stgc == STGCConfig()
    )
    assert type(loaded).__name__ == "LlavaForConditionalGeneration" and moe_blocks(loaded)
