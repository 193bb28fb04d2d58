"""The policy's forwards: gold-answer batches and the SFT loss, sampling rollouts, per-token log-probs and values."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ippo.train import ppo_math as pm
from ippo.train.tasks import Example, Task


def fork_rng():
    """Fork the CPU generator and, on a GPU machine, the current CUDA one (sampling there draws from it)."""
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else [])


def lm_forward(lm: nn.Module, ids: Tensor, attn: Tensor, **kwargs):
    """Forward with position ids from the attention mask, so left- and right-padded rows see 0, 1, 2, ..."""
    positions = (attn.long().cumsum(-1) - 1).clamp(min=0)
    return lm(input_ids=ids, attention_mask=attn, position_ids=positions, **kwargs)


def pack_answers(tokenizer, task: Task, examples: list[Example]) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``prompt + gold answer + eos``: ids (B, T), attention (B, T), answer mask (B, T-1).

    ``answer_mask[b, t]`` is 1 where logits position t predicts an answer (or eos) token.
    """
    rows = []
    for ex in examples:
        prompt = tokenizer(task.prompt(ex, tokenizer), add_special_tokens=False).input_ids
        answer = tokenizer(ex.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append((prompt, answer))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    answer_mask = torch.zeros(len(rows), width - 1)
    for b, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        ids[b, :n] = torch.tensor(prompt + answer)
        attn[b, :n] = 1
        answer_mask[b, len(prompt) - 1:n - 1] = 1
    return ids, attn, answer_mask


def sft_loss(lm: nn.Module, tokenizer, task: Task, examples: list[Example]) -> Tensor:
    """Mean token cross-entropy of the gold solutions (all answer tokens pooled): the SFT and validation loss."""
    device = next(lm.parameters()).device
    ids, attn, answer_mask = (t.to(device) for t in pack_answers(tokenizer, task, examples))
    first = int(answer_mask.argmax(1).min())  # logits only from the first answer position on (saves lm_head work)
    logits = lm_forward(lm, ids, attn, logits_to_keep=ids.shape[1] - first).logits[:, :-1]
    logp = pm.token_logprobs(logits, ids[:, first + 1:])
    return -pm.masked_mean(logp, answer_mask[:, first:])


@dataclass
class Rollout:
    """A batch of sampled episodes, prompts left-padded to ``prompt_len`` so responses start at one column."""

    ids: Tensor            # (B, P + R) prompt + response tokens
    attn: Tensor           # (B, P + R) 1 on real prompt tokens and on response tokens up to and incl. eos
    mask: Tensor           # (B, R) float, right-padded response mask
    prompt_len: int
    texts: list[str]       # decoded responses
    examples: list[Example]
    group: Tensor          # (B,) prompt index of each episode


@torch.no_grad()
def sample(lm: nn.Module, tokenizer, task: Task, examples: list[Example], k: int, temperature: float,
           max_new_tokens: int, gen_batch: int) -> Rollout:
    """``k`` completions per example (temperature 0 = greedy), generated ``gen_batch`` rows at a time."""
    episodes = [(i, ex) for i, ex in enumerate(examples) for _ in range(k)]
    prompts = tokenizer([task.prompt(ex, tokenizer) for _, ex in episodes], add_special_tokens=False,
                        padding=True, padding_side="left", return_tensors="pt").to(next(lm.parameters()).device)
    was_training = lm.training
    lm.eval()
    chunks = []
    for start in range(0, len(episodes), gen_batch):
        sl = slice(start, start + gen_batch)
        kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
            dict(do_sample=False)
        out = lm.generate(input_ids=prompts.input_ids[sl], attention_mask=prompts.attention_mask[sl],
                          max_new_tokens=max_new_tokens, min_new_tokens=1, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **kwargs)
        chunks.append(out[:, prompts.input_ids.shape[1]:])
    lm.train(was_training)
    width = max(c.shape[1] for c in chunks)
    response = torch.cat([nn.functional.pad(c, (0, width - c.shape[1]), value=tokenizer.pad_token_id)
                          for c in chunks])
    is_eos = (response == tokenizer.eos_token_id).long()
    mask = ((is_eos.cumsum(1) - is_eos) == 0).float()  # tokens up to and including the first eos
    texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True, clean_up_tokenization_spaces=False)
             for r, m in zip(response, mask)]
    ids = torch.cat([prompts.input_ids, response], 1)
    attn = torch.cat([prompts.attention_mask, mask.long()], 1)
    group = torch.tensor([i for i, _ in episodes], device=ids.device)
    return Rollout(ids, attn, mask, prompts.input_ids.shape[1], texts, [ex for _, ex in episodes], group)


def response_logprobs(lm: nn.Module, ro: Rollout, rows: Tensor | slice = slice(None),
                      value_head: nn.Module | None = None, temperature: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs (B, R) of the response tokens, and values (B, R) if ``value_head`` is given.

    Log-probs are those of the sampling policy: logits divided by ``temperature`` (the rollout's), so
    the PPO ratio and policy gradient are taken for the policy that generated the episodes.

    The value of token j is read at the position that predicts it (the state before it); the head sees
    detached hidden states, so the value loss never reaches the LoRA weights.
    """
    ids, attn = ro.ids[rows], ro.attn[rows]
    width = ids.shape[1] - ro.prompt_len
    out = lm_forward(lm, ids, attn, output_hidden_states=value_head is not None, logits_to_keep=width + 1)
    logits = out.logits[:, :-1]
    logp = pm.token_logprobs(logits / temperature if temperature > 0 else logits, ids[:, ro.prompt_len:])
    values = None
    if value_head is not None:
        hidden = out.hidden_states[-1][:, ro.prompt_len - 1:-1].detach()
        values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float()
    return logp, values
