"""Builders for tests, benchmarks and the demo; not used by the product.

* ``tiny_tokenizer``, ``tiny_llama``: a character tokenizer with ChatML special tokens, a random-init Llama.
* ``lora_llama``: ``tiny_llama`` with peft LoRA on every projection and random lora_B (``init_lora_B``).
* ``episode_losses`` (with ``next_token_targets`` for REINFORCE-style rows): per-episode losses l_i.
* ``per_episode_loop`` (with ``lora_pairs``, ``loss_influence``): the reference scores, one backward per episode.
* ``per_episode_gradients``: each episode's dense LoRA gradient, one backward per episode (the sketches'
  reference).
* ``peak_memory``: the peak of the bytes allocated by torch while a function runs (CPU: the profiler's
  allocation events; CUDA: the allocator's peak statistic).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ippo.kernels.ops import accumulation_dtype
from ippo.kernels.scorer import LoRAGrad, active_adapter, lora_linear_layers, lora_weights
from ippo.train.model import CHATML_TEMPLATE, add_lora
from ippo.train.ppo_math import token_logprobs


def tiny_tokenizer():
    """Character-level tokenizer (printable ASCII, newline, tab) with ChatML special tokens.

    Ids: 0 ``<pad>``, 1 ``<unk>``, 2 ``<|im_start|>``, 3 ``<|im_end|>`` (eos), then characters.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<|im_start|>", eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials[2:]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device | str = "cpu"):
    """Runs the block after torch.manual_seed(seed), then restores the RNG state of the CPU and of ``device``."""
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def tiny_llama(vocab_size: int, hidden_size: int = 32, num_layers: int = 2, seed: int = 0, *,
               intermediate_size: int | None = None, num_heads: int = 4, num_kv_heads: int = 2,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """Random-init ``LlamaForCausalLM`` in eval mode, built on ``device`` in ``dtype``; MLP width
    ``intermediate_size`` (default 2 x hidden). ``vocab_size`` should be ``len(tokenizer)``; the special ids
    (pad 0, bos 2, eos 3) are those of :func:`tiny_tokenizer`. Seeded by ``seed``; the global RNG is left alone.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if vocab_size < 1 or hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"vocab_size must be >= 1, hidden_size a multiple of num_heads and num_heads one of "
                         f"num_kv_heads; got vocab_size={vocab_size}, hidden_size={hidden_size}, "
                         f"num_heads={num_heads}, num_kv_heads={num_kv_heads}")
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=intermediate_size or 2 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=512, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    with _seeded(seed, device), torch.device(device):  # initialized in place: a 1.5B model is slow to move
        return LlamaForCausalLM(config).to(dtype).eval()


def init_lora_B(model: nn.Module, std: float) -> None:
    """Draws every lora_B weight from N(0, std), as after some training: peft starts lora_B at zero, where
    every dl/dA is zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


def lora_llama(vocab_size: int, rank: int, alpha: float | None = None, dropout: float = 0.0,
               lora_B_std: float = 0.02, seed: int = 0, **llama):
    """``tiny_llama(vocab_size, seed=seed, **llama)`` with peft LoRA (``add_lora``: rank, alpha default 2 rank,
    dropout) on q, k, v, o, gate, up, down, and lora_B ~ N(0, lora_B_std) (``init_lora_B``). Seeded like
    ``tiny_llama``."""
    with _seeded(seed, llama.get("device", "cpu")):
        model = add_lora(tiny_llama(vocab_size, seed=seed, **llama), r=rank,
                         alpha=2 * rank if alpha is None else alpha, dropout=dropout)
        init_lora_B(model, lora_B_std)
    return model


def episode_losses(model: nn.Module, input_ids: Tensor, targets: Tensor, weights: Tensor,
                   attention_mask: Tensor | None = None, position_ids: Tensor | None = None) -> Tensor:
    """(B,) per-episode losses of a batch with one episode per row,

        l_i = -sum_t weights[i, t] * log p(targets[i, t] | input_ids[i, :t + 1])

    input_ids, targets: (B, T) ids; weights: (B, T), 0 on padding and on tokens without a target. Log-probs
    are ``ippo.train.ppo_math.token_logprobs`` (float32, float64 for float64 logits), as in the trainer.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return -(weights * token_logprobs(logits, targets)).sum(1)


def next_token_targets(input_ids: Tensor, advantages: Tensor, attention_mask: Tensor | None = None):
    """(targets, weights) of REINFORCE-style losses for ``episode_losses``, l_i = -A_i sum_t log p(token t+1 |
    tokens <= t) over episode i's own tokens: targets[:, t] = input_ids[:, t + 1]; weights[i, t] = advantages[i]
    where tokens t and t+1 are both episode i's (attention_mask 1; default all), else 0. input_ids (B, T),
    advantages (B,)."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    weights = torch.zeros(input_ids.shape, dtype=advantages.dtype, device=input_ids.device)
    weights[:, :-1] = advantages[:, None] * (mask[:, :-1] * mask[:, 1:])
    return input_ids.roll(-1, dims=1), weights


def lora_pairs(model: nn.Module, val_grads: dict[str, LoRAGrad]) -> list[tuple[nn.Linear, Tensor]]:
    """[(lora_A or lora_B Linear of the active adapter, its validation gradient)] over every LoRA layer."""
    pairs = []
    for name, layer in lora_linear_layers(model).items():
        adapter = active_adapter(name, layer)
        pairs += [(layer.lora_A[adapter], val_grads[name].A), (layer.lora_B[adapter], val_grads[name].B)]
    return pairs


def loss_influence(loss: Tensor, pairs: list[tuple[nn.Linear, Tensor]], retain_graph: bool = False) -> Tensor:
    """<d loss / d theta, V> by autograd over the Linear weights theta of ``pairs`` (from ``lora_pairs``), in
    float64 for float64 validation gradients, else float32; a weight the loss does not reach counts 0."""
    grads = torch.autograd.grad(loss, [module.weight for module, _ in pairs], retain_graph=retain_graph,
                                allow_unused=True, materialize_grads=True)
    acc = accumulation_dtype(*(val for _, val in pairs))
    return torch.stack([(g.to(acc) * val.to(acc)).sum() for g, (_, val) in zip(grads, pairs)]).sum()


def per_episode_loop(model: nn.Module, val_grads: dict[str, LoRAGrad], input_ids: Tensor, targets: Tensor,
                     weights: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """(B,) the published method, the reference for every other: row i's episode alone in a batch of one (its
    attention_mask tokens, padding on either side dropped; default the whole row), one backward each, then
    ``loss_influence``. An empty row scores 0. Inputs as in ``episode_losses``."""
    pairs = lora_pairs(model, val_grads)
    scores = torch.zeros(input_ids.shape[0], dtype=accumulation_dtype(*(v for _, v in pairs)), device=input_ids.device)
    for i in range(input_ids.shape[0]):
        cols = torch.ones_like(input_ids[i], dtype=torch.bool) if attention_mask is None else attention_mask[i].bool()
        if cols.any():
            loss = episode_losses(model, input_ids[i, cols][None], targets[i, cols][None], weights[i, cols][None])
            scores[i] = loss_influence(loss.sum(), pairs)
    return scores


def per_episode_gradients(model: nn.Module, input_ids: Tensor, targets: Tensor, weights: Tensor,
                          attention_mask: Tensor | None = None) -> list[dict[str, LoRAGrad]]:
    """[{layer: LoRAGrad(dl_i/dA, dl_i/dB)}] per row, in the model's layer order, as ``per_episode_loop`` takes them
    (row i alone, its attention_mask tokens); an empty row gets zeros. Inputs as in ``episode_losses``."""
    layers = lora_weights(model)
    params = [w for pair in layers.values() for w in pair]
    out = []
    for i in range(input_ids.shape[0]):
        cols = torch.ones_like(input_ids[i], dtype=torch.bool) if attention_mask is None else attention_mask[i].bool()
        if cols.any():
            loss = episode_losses(model, input_ids[i, cols][None], targets[i, cols][None], weights[i, cols][None])
            grads = torch.autograd.grad(loss.sum(), params, allow_unused=True, materialize_grads=True)
        else:
            grads = [torch.zeros_like(p) for p in params]
        out.append({name: LoRAGrad(grads[2 * j], grads[2 * j + 1]) for j, name in enumerate(layers)})
    return out


def peak_memory(fn, device: torch.device | str = "cpu"):
    """(fn(), peak bytes allocated by torch above what was allocated when fn started).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: every allocation and free that torch's profiler records
    (``profile_memory=True``; read from its event tree, a private but long-stable API), summed in time order;
    memory allocated outside torch's allocator (e.g. by numpy in Triton's interpreter) is not seen."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    allocations = []

    def walk(node):
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    current = peak = 0
    for _, size in sorted(allocations, key=lambda a: a[0]):
        current += size
        peak = max(peak, current)
    return out, peak
