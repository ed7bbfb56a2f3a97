"""Model directories: unreadable checkpoints are one clear error naming the directory."""

import json
import re
import shutil

import pytest

from moevl.vlm.io import CheckpointError, load_model
from tests.fixtures.tiny_export import run_python


def test_truncated_or_corrupt_checkpoints_are_named(demo, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(demo.init, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"{broken}: cannot load the model")):
        load_model(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_model(broken)
    (broken / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (broken / "moevl.json").write_text("[")
    with pytest.raises(CheckpointError, match=r"moevl\.json is not valid JSON"):
        load_model(broken)


def test_a_moevl_checkpoint_and_its_processor_load_in_a_fresh_process_without_a_model_type_warning(
    demo, tmp_path
):
    # the processor reads config.json (model_type "moevl") through AutoConfig: load_model registers the format
    # first (nothing registers it at import any more); without that transformers warns that it instantiates
    # an unknown model type, and would build the processor from the wrong config class
    from moevl.checkpoint import save_moe_model
    from moevl.hf import upcycle

    model, processor = load_model(demo.init)
    save_moe_model(upcycle(model, num_experts=4, top_k=2), tmp_path / "moe", processor=processor)
    out = run_python(
        f"""
        import transformers
        transformers.logging.set_verbosity_warning()
        from moevl.vlm.io import load_model
        model, processor = load_model({str(tmp_path / "moe")!r})
        print(type(processor).__name__, type(model).__name__)
        """,
        tmp_path,
        stderr=True,
    )
    assert "instantiate a model of type" not in out and out.split()[-2:] == [
        type(processor).__name__,
        type(model).__name__,
    ]


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_a_text_only_language_model_is_named_as_such(demo, tmp_path, with_tokenizer):
    # it said "cannot load the processor (Unrecognized processing class ...)" or "Can't load image processor"
    from transformers import AutoTokenizer

    from moevl.vlm.io import check_model_dir
    from tests.fixtures.tiny import causal_lm

    path = tmp_path / "llama"
    causal_lm("llama").save_pretrained(path)
    if with_tokenizer:
        AutoTokenizer.from_pretrained(demo.init).save_pretrained(path)
    expected = (
        f"{path} is a text-only checkpoint (LlamaForCausalLM, model_type 'llama'): moevl's commands take "
        "vision-language checkpoints, which AutoModelForImageTextToText and AutoProcessor load"
    )
    for call in (check_model_dir, load_model):
        with pytest.raises(CheckpointError) as err:
            call(path)
        assert str(err.value).startswith(expected) and "moevl.hf.upcycle" in str(err.value)
    assert check_model_dir(demo.init) == demo.init  # a vision-language checkpoint passes


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(_torchvision_imports(), reason="torchvision is installed: the processor loads")
def test_a_processor_that_needs_a_missing_package_is_named_with_the_family(tmp_path):
    # an ImportError traceback from moevl eval before (load_model caught OSError and ValueError only)
    from tests.fixtures.checkpoints import PARTS, build_checkpoint

    path = build_checkpoint("qwen2_vl", tmp_path / "qwen2_vl")
    (path / PARTS).unlink()  # the processor as a real checkpoint saves it, its video processor included
    image = json.loads((path / "preprocessor_config.json").read_text())
    video = {k: v for k, v in image.items() if k != "image_processor_type"}
    (path / "video_preprocessor_config.json").write_text(
        json.dumps(video | {"video_processor_type": "Qwen2VLVideoProcessor"})
    )
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert str(err.value) == (
        f"{path}: the processor of this qwen2_vl checkpoint (Qwen2VLVideoProcessor) needs the package 'torchvision', "
        "which is not installed or does not import here; install torchvision in this environment (the build that "
        "matches the installed torch)"
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            ImportError("\nFooProcessor requires the Num2Words library but it was not found"),
            "(FooProcessor) needs the package 'num2words'",
        ),
        (
            ModuleNotFoundError("No module named 'timm.layers'", name="timm.layers"),
            "needs the package 'timm'",
        ),
        (
            ImportError(),
            "needs the package 'torchvision'",
        ),  # names nothing: torchvision, which does not import
    ],
)
def test_an_import_error_while_loading_names_the_package(demo, monkeypatch, error, expected):
    import importlib

    from transformers import AutoProcessor

    def raise_error(*args, **kwargs):
        raise error

    real_import = importlib.import_module

    def no_torchvision(name, *args):
        if name == "torchvision":
            raise ImportError("no torchvision here")
        return real_import(name, *args)

    monkeypatch.setattr(AutoProcessor, "from_pretrained", raise_error)
    monkeypatch.setattr(importlib, "import_module", no_torchvision)
    with pytest.raises(CheckpointError) as err:
        load_model(demo.init)
    message = str(err.value)
    assert message.startswith(f"{demo.init}: the processor of this llava checkpoint") and expected in message
    assert "\n" not in message


def test_a_moevl_format_export_says_how_to_load_it_and_its_readme_does_it(demo, tmp_path):
    # plain transformers said only that model type 'moevl' is unknown; nothing in the export said what to do
    from typer.testing import CliRunner

    from moevl.checkpoint import save_moe_model
    from moevl.cli import app
    from moevl.hf import upcycle

    model, processor = load_model(demo.init)
    save_moe_model(upcycle(model, num_experts=4, top_k=2), tmp_path / "moe", processor=processor)  # alternate
    out = tmp_path / "exported"
    result = CliRunner().invoke(
        app, ["export", "--model", str(tmp_path / "moe"), "--out", str(out), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("moevl: ") and lines[-1] == (
        "load it with moevl installed: moevl.checkpoint.register_auto_classes(), then "
        f"AutoModelForImageTextToText.from_pretrained({str(out)!r}) (plain transformers does not know model_type "
        f"'moevl'; {out / 'README.md'} says more)"
    )
    readme = (out / "README.md").read_text()
    assert "moevl.checkpoint.register_auto_classes()" in readme
    code = readme.split("```python\n")[1].split("```")[0]  # the README's own code, in a fresh process
    printed = run_python(code + "print(type(model).__name__, type(processor).__name__)\n", tmp_path)
    assert printed.split() == ["LlavaForConditionalGeneration", type(processor).__name__]
