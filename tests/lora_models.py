"""Small random-init models with peft LoRA on every linear projection, and per-episode losses, for the scorer tests."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import DEVICE

VOCAB = 50


def tiny_llama(lora_dropout=0.0, r=3, alpha=5, seed=0):
    """float64 2-layer Llama (hidden 24, MLP 40, 4 heads, 2 kv heads) with LoRA r=3 (scaling 5/3) on q,k,v,o,gate,up,down.
    lora_B is random (peft starts it at zero, which would make every dl/dA zero)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).double().to(DEVICE)
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=lora_dropout,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def lora_parameters(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


def random_episodes(lengths, seed=0):
    """Per episode: token ids, per-token target ids and per-token loss weights (like PPO advantages)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (n,), generator=g), torch.randint(0, VOCAB, (n,), generator=g),
             torch.randn(n, generator=g, dtype=torch.float64)) for n in lengths]


def batch(episodes, padding="right", row_length=None):
    """(input_ids, attention_mask, position_ids, targets, weights, segment_ids) on DEVICE, one episode per row,
    padded to ``row_length`` on the given side; padding has segment id -1 and weight 0."""
    length = row_length or max(1, max(len(e[0]) for e in episodes))
    rows = len(episodes)
    input_ids = torch.zeros(rows, length, dtype=torch.long)
    targets = torch.zeros(rows, length, dtype=torch.long)
    weights = torch.zeros(rows, length, dtype=torch.float64)
    segment_ids = torch.full((rows, length), -1, dtype=torch.long)
    mask = torch.zeros(rows, length, dtype=torch.long)
    for i, (ids, tgt, w) in enumerate(episodes):
        n = len(ids)
        cols = slice(length - n, length) if padding == "left" else slice(0, n)
        input_ids[i, cols], targets[i, cols], weights[i, cols], segment_ids[i, cols], mask[i, cols] = ids, tgt, w, i, 1
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    return tuple(t.to(DEVICE) for t in (input_ids, mask, position_ids, targets, weights, segment_ids))


def per_token_loss(model, input_ids, mask, position_ids, targets, weights):
    """(B, T) weighted token log-likelihoods; an episode's loss l_i is the sum over its tokens."""
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    return logp * weights
