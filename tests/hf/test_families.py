"""Every MoE family of the installed transformers, adopted by behaviour (``moevl.hf.adopt``).

The families are found, not listed: the modeling files that use transformers' experts interface
(``use_experts_implementation``). Each gets a tiny config (hidden 32, 2 layers, 8 experts, vocab 128;
its vision/audio towers tiny too), built from the config class's defaults with the sizes shrunk
(``tiny_config``; ``OVERRIDES`` holds the few keys a family needs beyond that). For each family:

* the adopted model's logits equal the native model's (max |Δ| <= 1e-5), with the native keys;
* one STGC training step gives finite, non-zero gradients on every adopted router (families whose
  experts compute a gate function moevl's experts function does not are adopted without STGC: the
  refusal of STGC names the class, and a plain step is checked instead);
* ``moevl.checkpoint.export`` writes a native checkpoint that plain transformers reloads with equal logits;

or ``adopt`` refuses the family, naming its block class and why. The shrinking keeps one decoder layer of
each kind (attention type, sparse or dense MLP), renumbers layer-index lists and tables, shrinks widths that
must match a hidden size with it, and tests a composite whose top class has no forward (Qwen3-Omni) through
its thinker. Every family's tiny config builds with transformers 5.25: a family a newer version adds that does
not build fails here, for the table above to learn it. ``python -m tests.hf.test_families`` prints the table.
"""

from __future__ import annotations

import copy
import glob
import os
import re
import time
from pathlib import Path

import pytest
import torch
import transformers
from transformers import CONFIG_MAPPING

from moevl.checkpoint import export
from moevl.hf import adopt, moe_blocks, moe_state
from moevl.hf.adopt import is_native_moe
from moevl.stgc import STGCConfig

pytestmark = pytest.mark.slow  # multi-process or end-to-end: `pytest -m 'not slow'` skips them

_MODELS = os.path.join(os.path.dirname(transformers.__file__), "models")
FAMILIES = sorted(
    os.path.basename(os.path.dirname(path))
    for path in glob.glob(os.path.join(_MODELS, "*", "modeling_*.py"))
    if "use_experts_implementation" in Path(path).read_text(encoding="utf-8")
)

TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    expert_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=128,
    num_experts=8,
    num_local_experts=8,
    n_routed_experts=8,
    moe_num_experts=8,
    num_experts_per_tok=2,
    moe_k=2,
    moe_topk=2,
    top_k_experts=2,
    max_position_embeddings=256,
    first_k_dense_replace=0,
    num_shared_experts=1,
    n_shared_experts=1,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    qk_head_dim=16,  # qk_nope_head_dim + qk_rope_head_dim
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    vocab_size_per_layer_input=128,  # per-layer input embeddings (Gemma)
    hidden_size_per_layer_input=8,
    moe_hidden_size=32,
    num_layers=2,  # LongCat's name for num_hidden_layers
    ffn_hidden_size=64,
    expert_ffn_hidden_size=32,
)
TOWER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    depth=1,
    n_layers=1,
    num_attention_heads=2,
    num_heads=2,
    out_hidden_size=32,
    embed_dim=32,
    projector_hidden_size=64,
    d_model=32,  # whisper-style audio encoders
    encoder_layers=1,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    downsample_hidden_size=32,
)

#: keys a family needs beyond the shrunk defaults (per config, or per sub-config name), each for a reason
#: the shrinking cannot know
OVERRIDES: dict[str, dict] = {
    # layer kinds or MoE left unset (None) or off in the default config
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": ["sparse", "sparse"]}},
    "gemma4": {"text_config": {"enable_moe_block": True}},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 0},
    # all-Mamba by default, which transformers' own mask creation refuses: one attention layer
    "granitemoehybrid": {
        "mamba_n_heads": 8,
        "mamba_d_head": 8,
        "layer_types": ["linear_attention", "full_attention"],
    },
    # attention every 8th layer from layer 4: layer 0 attention, layer 1 Mamba with experts
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 0},
    # multimodal RoPE sections the modeling file defaults for head_dim 128 (Ernie: h = w sections)
    "ernie4_5_vl_moe": {"text_config": {"rope_parameters": {"rope_theta": 5e5, "mrope_section": [1, 1, 2]}}},
    "glm4v_moe": {"text_config": {"rope_parameters": {"rope_theta": 1e4, "mrope_section": [1, 1, 0]}}},
    # head dims tied to other dims by the architecture
    "dots3_note": {"text_config": {"head_dim": 16}},  # sliding-window layers: qk_nope + qk_rope
    "mistral4": {"head_dim": 16},  # its rotary half (head_dim x 0.5) is qk_rope_head_dim
    "kolibri1_1": {"head_dim": 16, "index_num_heads": 2},  # keys/values rounded to NVFP4 in blocks of 16
    # the indexed-attention layers need the indexer's sizes, which the default config leaves unset
    "qwen4_exp": {
        "text_config": dict(
            indexer_n_heads=2,
            indexer_kv_heads=1,
            indexer_head_dim=8,
            indexer_budget=8,
            indexer_compress_ratio=4,
        )
    },
    # the thinker's position ids read a token id that only the released checkpoints' thinker config carries
    "qwen3_omni_moe": {"thinker_config": {"vision_start_token_id": 151652}},
    "zaya": {"num_experts_per_tok": 1},
    "step3p7": {"text_config": {"sliding_window": 16}},
}

VOCAB = 100  # token ids drawn below every family's vocabulary
TOLERANCE = 1e-5
RESULTS: dict[str, tuple[str, str]] = {}  # family -> (outcome, detail), for the summary


def _widths(values: dict) -> set[int]:
    """The hidden sizes of a config and its sub-configs (the widths other keys must match)."""
    found = {v for k in ("hidden_size", "d_model") if isinstance(v := values.get(k), int)}
    for value in values.values():
        if isinstance(value, dict):
            found |= _widths(value)
    return found


def _shrink(values: dict, table: dict, widths: set[int] = frozenset()) -> dict:
    out = dict(values)
    for key, value in table.items():
        if key in out and not isinstance(out[key], dict) and out[key] != 0:  # 0: none (e.g. no RoPE dims)
            out[key] = [value] * len(out[key]) if isinstance(out[key], list) else value
    for key, value in values.items():
        if isinstance(value, dict) and key.endswith(
            "_config"
        ):  # nested sub-configs (e.g. a vision encoder's)
            out[key] = _shrink(value, _table(key) if table is TEXT else TOWER, widths)
        elif (
            key not in table and type(value) is int and value in widths and re.search("dim|size|hidden", key)
        ):
            out[key] = TEXT[
                "hidden_size"
            ]  # a width that must match a (shrunk) hidden size: adapters, projectors
    if "kv_lora_rank" in out:  # multi-head latent attention: as many key/value heads as heads
        out["num_key_value_heads"] = out.get("num_attention_heads", 4)
    if isinstance(out.get("q_lora_rank"), int):
        out["q_lora_rank"] = 16
    for key in ("n_group", "num_group", "num_expert_group"):
        if isinstance(out.get(key), int) and out[key] > 1:
            out[key], out["topk_group"] = 2, 1
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "mrope_section" in rope:
        out["rope_parameters"] = {**rope, "mrope_section": [2, 1, 1]}  # sums to head_dim / 2
    old, new = values.get("num_hidden_layers"), out.get("num_hidden_layers")
    if isinstance(old, int) and isinstance(new, int) and old != new:
        _keep_layers(values, out, table, old, new)
    return out


def _keep_layers(values: dict, out: dict, table: dict, old: int, new: int) -> None:
    """Shrink the per-layer keys of ``values`` (``old`` layers) into ``out`` (``new`` layers), keeping one
    layer of each kind: greedily the layers that show the most per-layer values not yet kept (a dense MLP
    is no kind to keep), the first such layer on a tie."""
    per_layer = [k for k, v in values.items() if isinstance(v, list) and len(v) == old and k not in table]
    kinds = [
        {(k, repr(values[k][i])) for k in per_layer if "dense" not in str(values[k][i]).lower()}
        for i in range(old)
    ]
    keep: list[int] = []
    while len(keep) < new:
        shown = set().union(*(kinds[i] for i in keep))
        keep.append(max((i for i in range(old) if i not in keep), key=lambda i: (len(kinds[i] - shown), -i)))
    keep.sort()
    for key in per_layer:
        kept = [values[key][i] for i in keep]
        if "layer" in key and all(isinstance(x, int) and x in keep for x in kept):  # a layer index per layer
            kept = [keep.index(x) for x in kept]
        out[key] = kept
    for key, value in values.items():
        if key in per_layer or key in table:
            continue
        if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            # {layer index: ...} tables keep the kept layers, renumbered
            out[key] = {
                keep.index(int(k)): _shrink(v, table) if isinstance(v, dict) else v
                for k, v in value.items()
                if int(k) in keep
            }
        elif (
            key.endswith(("layers", "layer_ids"))
            and isinstance(value, list)
            and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < old for x in value)
        ):  # a list of layer indices (e.g. the layers without experts)
            out[key] = [keep.index(x) for x in value if x in keep]


def tiny_config(family: str):
    config_class = CONFIG_MAPPING[family] if family in CONFIG_MAPPING else _config_class(family)
    base = config_class()
    values = base.to_dict()
    subs = [k for k, v in values.items() if isinstance(v, dict) and k.endswith("_config")]
    extra = OVERRIDES.get(family, {})
    widths = _widths(values)
    if subs:
        top = {k: v for k, v in TOWER.items() if "projector" in k}  # a composite's own projector
        kwargs = {k: v for k, v in _shrink(values, top, widths).items() if v != values[k] and k not in subs}
        for key in subs:
            kwargs[key] = {**_shrink(getattr(base, key).to_dict(), _table(key), widths), **extra.get(key, {})}
        kwargs.update({k: v for k, v in extra.items() if k not in subs})
        return _runnable(config_class(**kwargs))
    return config_class(**{**_shrink(values, TEXT, widths), **extra})


def _table(key: str) -> dict:
    """The sizes for a sub-config: a tower's (vision, audio, speech, vocoder) or a language model's."""
    return TOWER if any(w in key for w in ("vision", "audio", "speech", "code2wav")) else TEXT


def _runnable(config):
    """``config``, or for a composite whose top model class has no forward of its own (Qwen3-Omni: thinker,
    talker and vocoder) the sub-config of its first part that runs on token ids (the thinker)."""
    try:
        if _model_class(config).forward is not torch.nn.Module.forward:
            return config
    except KeyError:
        pass
    for key in config.sub_configs:
        sub = getattr(config, key)
        try:
            if _model_class(sub).forward is not torch.nn.Module.forward:
                return sub
        except KeyError:
            continue
    return config


def _config_class(family: str):
    import importlib

    module = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    found = [c for c in vars(module).values() if isinstance(c, type) and c.__module__ == module.__name__]
    found = [c for c in found if issubclass(c, transformers.PreTrainedConfig)]
    return next((c for c in found if getattr(c, "sub_configs", None)), found[0])


def _model_class(config):
    for mapping in (
        transformers.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
        transformers.MODEL_FOR_CAUSAL_LM_MAPPING,
    ):
        if type(config) in mapping:
            return mapping[type(config)]
    module = type(config).__module__.replace(".configuration_", ".modeling_")
    import importlib

    classes = vars(importlib.import_module(module))
    for suffix in ("ForConditionalGeneration", "ForCausalLM", "ForTokenClassification"):
        for name, cls in classes.items():
            if name.endswith(suffix) and getattr(cls, "config_class", None) is type(config):
                return cls
    raise KeyError(f"no language-model class for {type(config).__name__}")


MAX_PARAMETERS = 20_000_000  # a config the shrinking did not reach (a tower with its own sizes) is not tiny


def tiny_model(family: str):
    config = tiny_config(family)
    model_class = _model_class(config)
    with torch.device("meta"):
        size = sum(p.numel() for p in model_class(copy.deepcopy(config)).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"the shrunk config still has {size / 1e6:.0f}M parameters")
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():  # routers that start at zero (or a bias at zero) route every token alike
        for name, p in model.named_parameters():
            if p.dim() == 2 and re.search(r"(gate|router)(\.\w+)?\.weight$", name):
                p.normal_(0.0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    return ids, torch.ones_like(ids)


def _logits(model, ids, mask):
    torch.manual_seed(0)  # a model that draws noise in its forward (block diffusion) draws the same
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def _build(family: str):
    model = tiny_model(family)
    ids, mask = _batch()
    _logits(model, ids, mask)
    if not is_native_moe(model):
        raise ValueError("the tiny config has no sparse layer")
    return model, ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_adopted_exactly_or_refused_by_name(family, tmp_path):
    native, ids, mask = _build(family)
    ref = _logits(native, ids, mask)
    try:
        model = adopt(copy.deepcopy(native))
    except ValueError as err:
        blocks = {type(m).__name__ for m in native.modules() if _owns_experts(m)}
        assert any(name in str(err) for name in blocks), (blocks, str(err))
        RESULTS[family] = ("refused", str(err).removeprefix("adopt: "))
        return
    assert moe_blocks(model), family
    diff = float((_logits(model, ids, mask) - ref).abs().max())
    assert diff <= TOLERANCE, (family, diff)
    assert model.state_dict().keys() == native.state_dict().keys()

    # one training step: STGC where moevl's experts function computes the experts
    stgc = "STGC"
    try:
        trained = adopt(copy.deepcopy(native), stgc=STGCConfig(threshold=0.3)).train()
    except ValueError as err:
        assert "STGC" in str(err) and any(
            b.experts.native.__class__.__name__ in str(err) for b in moe_blocks(model)
        )
        trained, stgc = (
            adopt(copy.deepcopy(native)).train(),
            f"no STGC ({str(err).split('but ')[-1].split(' (layer')[0]})",
        )
    torch.manual_seed(0)
    labels = ids % ref.shape[-1]  # the ids themselves, or classes of a token classifier
    out = trained(input_ids=ids, attention_mask=mask, labels=labels)
    if out.loss is None:  # a model that takes no labels (block diffusion, its own canvas): a loss on its
        # logits, plus the MoE layers' auxiliary losses (moevl adds them where the model computes a loss)
        aux = sum(r.aux_loss() for r in moe_state(trained).context.records.values())
        out.loss = out.logits.float().logsumexp(-1).mean() + aux
    out.loss.backward()
    for block in moe_blocks(trained):
        grads = [
            p.grad for p in block.router_parameters() if p.dim() == 2 and p.shape[0] > 1
        ]  # weights, not (1, E) biases
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), (
            family,
            block.layer_index,
        )
        assert any(g.abs().sum() > 0 for g in grads), (family, block.layer_index)
    if stgc == "STGC":
        records = moe_state(trained).context.records.values()
        assert records and all(r.stgc is not None and r.stgc.ready for r in records)

    # export: plain transformers reloads it with the same logits
    try:
        result = export(model, tmp_path / "exported", require_native=True)
        reloaded = _model_class(native.config).from_pretrained(tmp_path / "exported").eval()
    except Exception as err:  # is it the export, or transformers' own round trip of the tiny config?
        with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises on its own model
            native.save_pretrained(tmp_path / "native")
            _model_class(native.config).from_pretrained(tmp_path / "native")
        first = str(err).splitlines()[0][:100]
        RESULTS[family] = ("exact", f"{stgc}; not exported: transformers' own save/reload fails ({first})")
        return
    diff_export = float((_logits(reloaded, ids, mask) - ref).abs().max())
    assert diff_export <= TOLERANCE, (family, diff_export, result.reason)
    RESULTS[family] = ("exact", stgc)


def _owns_experts(module) -> bool:
    from moevl.hf.adopt import is_native_sparse_block

    return is_native_sparse_block(module)


@pytest.fixture(scope="module", autouse=True)
def _summary(pytestconfig):
    start = time.perf_counter()
    yield
    if RESULTS:
        capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print("\n" + "\n".join(summary_lines(time.perf_counter() - start)), flush=True)


def summary_lines(seconds: float | None = None) -> list[str]:
    counts = {k: sum(1 for o, _ in RESULTS.values() if o == k) for k in ("exact", "refused")}
    no_stgc = sum(1 for o, d in RESULTS.values() if o == "exact" and d != "STGC")
    took = "" if seconds is None else f" in {seconds:.0f} s"
    lines = [
        f"MoE families of transformers {transformers.__version__}: {len(RESULTS)} run{took}: "
        f"{counts['exact']} exact ({no_stgc} of them without STGC), {counts['refused']} refused"
    ]
    lines += [f"| {f} | {o} | {d} |" for f, (o, d) in sorted(RESULTS.items())]
    return lines


if __name__ == "__main__":  # the README table: python -m tests.hf.test_families
    import sys

    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
