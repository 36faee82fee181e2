"""A registry model's GGUF as the Hugging Face directory vLLM loads: ``sled-verifier models
convert NAME`` (once; the directory is cached beside the GGUF).

vLLM reads safetensors, not GGUF (its GGUF loader is GPU-only). transformers dequantizes the GGUF
into a torch model whose weights are written as safetensors, with the config's quantization entry
dropped (the weights are plain floats now). The target's tokenizer stays the GGUF's: the vLLM runner
tokenizes with the same llama.cpp vocabulary as the llama.cpp runner, so ids, chat templates and
the vocabulary hash devices check are the same on both engines. ``sled.json`` names that GGUF.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from shared.models import REGISTRY, ModelError, cache_dir, resolve

MARKER = "sled.json"  # in a converted directory: the GGUF it came from (its tokenizer)


def hf_cache_dir() -> Path:
    """Where converted directories live: beside the GGUF cache (``.../sled/hf``)."""
    return cache_dir().parent / "hf"


def converted_dir(name: str) -> Path:
    return hf_cache_dir() / name


def tokenizer_gguf(model_dir: Path, tokenizer: str | None = None) -> Path:
    """The GGUF whose vocabulary tokenizes for ``model_dir``: ``tokenizer`` (a registry name or a
    GGUF path: the same model's GGUF, for a directory of one's own), else the one it was
    converted from. Drafts arrive as bytes that may end inside a UTF-8 character; llama.cpp's
    tokenizer takes such bytes as they are, which is why the verifier keeps it on vLLM too."""
    if tokenizer is not None:
        return resolve(tokenizer)
    marker = model_dir / MARKER
    if not marker.is_file():
        raise ModelError(f"{model_dir} has no {MARKER}: give --tokenizer with the same model's GGUF, or "
                         "convert a registry model with `sled-verifier models convert NAME`")
    return resolve(json.loads(marker.read_text())["gguf"])


def check_vocabulary(model_dir: Path, n_vocab: int) -> None:
    """The model's output rows must index the tokenizer's ids one for one."""
    config = model_dir / "config.json"
    size = json.loads(config.read_text()).get("vocab_size") if config.is_file() else None
    if size is not None and size != n_vocab:
        raise ModelError(f"{model_dir}: the model scores {size} ids but the tokenizer has {n_vocab}: "
                         "give --tokenizer the GGUF of this same model")


def model_dir(name_or_dir: str) -> Path:
    """The HF directory for ``--engine vllm --model``: a converted registry model or a directory."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    if name_or_dir not in REGISTRY:
        raise ModelError(f"--engine vllm: '{name_or_dir}' is neither a directory nor one of: {', '.join(REGISTRY)}")
    out = converted_dir(name_or_dir)
    if not (out / MARKER).is_file():
        raise ModelError(f"model '{name_or_dir}' is not converted for vLLM yet; run "
                         f"`sled-verifier models convert {name_or_dir}` (once, about a minute a GB)")
    return out


def convert(name: str) -> Path:
    """Write the HF directory of registry model ``name`` (float32, as the GGUF dequantizes) into
    the cache, atomically; an existing conversion is kept."""
    out = converted_dir(name)
    if (out / MARKER).is_file():
        return out
    gguf = resolve(name)
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise ModelError(f"converting needs the vLLM environment (scripts/setup-vllm.sh): {e}") from None
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantized weights are plain floats: the config must not announce a GGUF quantization.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.architectures = [type(model).__name__]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        (tmp / MARKER).write_text(json.dumps({"gguf": name, "source": gguf.name}) + "\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
