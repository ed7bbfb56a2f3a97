"""README's Python examples run as written.

Every ```python block of README.md is executed verbatim, in a fresh namespace, in a temporary directory
holding tiny checkpoints (built from configs, no download) at the paths the blocks load from
(``CHECKPOINTS``). A block that cannot run offline is marked in README with ``<!-- not run: reason -->``
on the line before it; those are listed, and only those are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(?:<!-- not run: (?P<reason>.*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks() -> list[tuple[int, str, str | None]]:
    """(line number, code, reason it is not run or None) for each python block."""
    text = README.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start("code")) + 1, m.group("code"), m.group("reason"))
        for m in _BLOCK.finditer(text)
    ]


def _tiny_llava(path: Path) -> None:
    from tests.fixtures.tiny import tiny_llava

    tiny_llava().save_pretrained(path)


def _tiny_qwen3_vl_moe(path: Path) -> None:
    from tests.hf.test_families import tiny_model

    tiny_model("qwen3_vl_moe").save_pretrained(path)


#: checkpoint path a README block loads -> how this test writes a tiny one there
CHECKPOINTS = {"ckpt/llava": _tiny_llava, "ckpt/qwen3-vl-moe": _tiny_qwen3_vl_moe}
_PATH = re.compile(r"""from_pretrained\(\s*["']([^"']+)["']""")

BLOCKS = _blocks()
NOT_RUN = [(line, reason) for line, _, reason in BLOCKS if reason is not None]


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2, BLOCKS  # the regex still finds them (a README reshuffle must not skip them all)
    print("README blocks not run:", NOT_RUN or "none")


@pytest.mark.parametrize("line,code,reason", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_example_runs_verbatim(line, code, reason, tmp_path, monkeypatch):
    if reason is not None:
        pytest.skip(f"README.md:{line} marked not run: {reason}")
    for path in _PATH.findall(code):
        assert path in CHECKPOINTS, (
            f"README.md:{line} loads {path!r}: add a tiny checkpoint for it to CHECKPOINTS"
        )
        CHECKPOINTS[path](tmp_path / path)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # the README block, verbatim
    model = namespace.get("model")
    if model is not None:  # every example makes a moevl MoE model: check that it did
        from moevl.hf import moe_blocks

        assert moe_blocks(model), f"README.md:{line}: the example's model has no moevl MoE layer"
