"""Tiny models for the export, checkpoint-format and MLP-by-shape tests (no downloads)."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

import moevl
from tests.hf.tiny import COMMON, IMAGE_TOKEN, tiny_llava
from tests.processes import run


def qwen3(seed: int = 0, **overrides):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(**{**COMMON, "num_key_value_heads": 2, "head_dim": 8, **overrides})
    return Qwen3ForCausalLM(config).eval()


def llava_qwen3(seed: int = 0):
    """``tiny_llava`` with a Qwen3 language model."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen3Config

    base = tiny_llava(seed).config
    text = Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=8)
    config = LlavaConfig(
        vision_config=base.vision_config,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config).eval()


def gpt_neox(seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPTNeoXForCausalLM(config).eval()


def gpt_j(seed: int = 0):
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(seed)
    config = GPTJConfig(
        vocab_size=96,
        n_embd=32,
        n_layer=3,
        n_head=4,
        rotary_dim=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPTJForCausalLM(config).eval()


def make_routing_matter(model: nn.Module, seed: int = 0) -> nn.Module:
    """Upcycled experts are identical copies and routers start small: give each expert its own
    weights and the routers a spread, so a wrong expert order, router or weight mapping changes
    the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.router.weight") or name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif ".mlp.experts." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def text_batch(seed: int = 0):
    """(3, 12) token ids, row 1 right-padded after 8 tokens, row 2 left-padded before 3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def tiny_processor():
    """A LLaVA processor for ``tiny_llava``: word-level tokenizer ``w0..w94`` + ``<image>`` (id 95)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(95)}
    vocab["<image>"] = IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="w0", pad_token="w0", extra_special_tokens={"image_token": "<image>"}
    )
    images = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )


def run_python(code: str, tmp_path) -> str:
    """Run ``code`` in a fresh interpreter (this checkout's moevl importable) in ``tmp_path``."""
    env = {**os.environ, "PYTHONPATH": str(Path(moevl.__file__).parents[1])}
    result = run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
