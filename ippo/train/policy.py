"""The policy's forwards: gold-answer batches and the SFT loss, sampling rollouts, per-token log-probs and values."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ippo.kernels.scorer import LoRAGrad
from ippo.train import ppo_math as pm
from ippo.train.tasks import Example, Task


def fork_rng():
    """Fork the CPU generator and, on a GPU machine, the current CUDA one (sampling there draws from it)."""
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else [])


def lm_forward(lm: nn.Module, ids: Tensor, attn: Tensor, **kwargs):
    """Forward with position ids from the attention mask, so left- and right-padded rows see 0, 1, 2, ..."""
    positions = (attn.long().cumsum(-1) - 1).clamp(min=0)
    return lm(input_ids=ids, attention_mask=attn, position_ids=positions, **kwargs)


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

    def to(self, device) -> Rollout:
        return Rollout(self.ids.to(device), self.attn.to(device), self.mask.to(device), self.prompt_len, self.texts,
                       self.examples, self.group.to(device))


ANSWER_MARK = "####"


def pack_answers(tokenizer, task: Task, examples: list[Example], final_answer_only: bool = False) -> Rollout:
    """``prompt + gold answer + eos`` of each example as a :class:`Rollout` whose responses are the gold answers:
    prompts left-padded to one column, answers right-padded, so ``response_logprobs`` reads their log-probs with
    logits for the answer positions only. Tokenized once: micro-batches are row subsets (``trim_rows``).

    ``final_answer_only``: the mask covers only the tokens that overlap the final answer, the text after the last
    ``####`` without surrounding whitespace (e.g. "-8" of "... #### -8"), not the solution's steps nor eos; a gold
    answer without the mark keeps its whole mask."""
    prompts = [tokenizer(task.prompt(ex, tokenizer), add_special_tokens=False).input_ids for ex in examples]
    encoded = [tokenizer(ex.answer, add_special_tokens=False, return_offsets_mapping=final_answer_only)
               for ex in examples]
    answers = [enc.input_ids + [tokenizer.eos_token_id] for enc in encoded]
    prompt_len, width = max(map(len, prompts)), max(map(len, answers))
    ids = torch.full((len(examples), prompt_len + width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, (prompt, answer) in enumerate(zip(prompts, answers)):
        ids[b, prompt_len - len(prompt):prompt_len + len(answer)] = torch.tensor(prompt + answer)
        attn[b, prompt_len - len(prompt):prompt_len + len(answer)] = 1
    mask = attn[:, prompt_len:].float()
    if final_answer_only:
        for b, (ex, enc) in enumerate(zip(examples, encoded)):
            mark = ex.answer.rfind(ANSWER_MARK)
            if mark >= 0:
                tail = ex.answer[mark + len(ANSWER_MARK):]
                start = len(ex.answer) - len(tail) + (len(tail) - len(tail.lstrip()))
                stop = start + len(tail.strip())
                mask[b] = 0
                spans = enc.offset_mapping
                mask[b, :len(spans)] = torch.tensor([float(end > start and first < stop) for first, end in spans])
    return Rollout(ids, attn, mask, prompt_len, [ex.answer for ex in examples], list(examples),
                   torch.arange(len(examples)))


def trim_rows(ro: Rollout, rows: Tensor) -> Rollout:
    """The episodes ``rows`` of ``ro`` without the columns that are padding in all of them (narrower forwards)."""
    ids, attn, mask = ro.ids[rows], ro.attn[rows], ro.mask[rows]
    first = int(attn[:, :ro.prompt_len].sum(1).max())  # the longest prompt of these rows
    used = torch.nonzero(mask.any(0))  # the last response column any of these rows uses (masks may have gaps)
    width = int(used[-1]) + 1 if len(used) else 1
    cols = slice(ro.prompt_len - first, ro.prompt_len + width)
    return Rollout(ids[:, cols], attn[:, cols], mask[:, :width], first, [ro.texts[i] for i in rows.tolist()],
                   [ro.examples[i] for i in rows.tolist()], ro.group[rows])


def length_batches(ro: Rollout, batch: int) -> list[Tensor]:
    """Row indices of ``ro`` in micro-batches of ``batch`` episodes of similar length (less padding per batch)."""
    return list(torch.argsort(ro.attn.sum(1), stable=True).split(batch))


def buffer_logprobs(lm: nn.Module, ro: Rollout, batch: int, value_head: nn.Module | None = None,
                    temperature: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """``response_logprobs`` of every episode of ``ro``, (B, R) with 0 on padding, computed ``batch`` episodes of
    similar length at a time, each micro-batch without its all-padding columns (memory of ``batch`` episodes)."""
    logp = values = None
    for rows in length_batches(ro, batch):
        sub = trim_rows(ro, rows)
        lp, v = response_logprobs(lm, sub, value_head=value_head, temperature=temperature)
        logp = put_rows(logp, rows, lp * sub.mask, ro.mask.shape)
        if value_head is not None:
            values = put_rows(values, rows, v * sub.mask, ro.mask.shape)
    return logp, values


def put_rows(out: Tensor | None, rows: Tensor, part: Tensor, shape) -> Tensor:
    """``out[rows, :width] = part`` (width = part's), ``out`` made as zeros of ``shape`` and part's dtype if None."""
    out = part.new_zeros(shape) if out is None else out
    out[rows, :part.shape[1]] = part
    return out


def answer_nll(lm: nn.Module, gold: Rollout) -> tuple[Tensor, Tensor]:
    """Sum of the token cross-entropies of ``gold``'s answers (a graph to the LoRA weights) and their count."""
    logp, _ = response_logprobs(lm, gold)
    return -(logp * gold.mask).sum(), gold.mask.sum()


def sft_loss(lm: nn.Module, tokenizer, task: Task, examples: list[Example]) -> Tensor:
    """Mean token cross-entropy of the gold solutions (all answer tokens pooled): the SFT and validation loss."""
    device = next(lm.parameters()).device
    nll, count = answer_nll(lm, pack_answers(tokenizer, task, examples).to(device))
    return nll / count


def validation_gradient(lm: nn.Module, tokenizer, task: Task, examples: list[Example],
                        batch: int, final_answer_only: bool = False) -> dict[str, LoRAGrad]:
    """d sft_loss(examples) / d (LoRA A, B) of every LoRA layer, accumulated over micro-batches of ``batch`` pairs;
    ``final_answer_only``: the loss of the final answers' tokens only (``pack_answers``).

    Each micro-batch adds the gradient of its summed token losses divided by the answer-token count of all
    ``examples``, so the result is the one-batch gradient up to rounding while the memory is that of ``batch``
    pairs. Pairs are grouped by length (less padding). The parameters' ``.grad`` are left alone. With the LoRA
    parameters sharded by FSDP2 the gradient is taken as ``ippo.kernels.validation_gradients`` takes it (with
    respect to the all-gathered weights the forward used): full plain tensors, this process's, no communication.
    """
    from ippo.kernels import check_validation_gradient, differentiable_weights, lora_weights

    layers = lora_weights(lm)
    params = [w for pair in layers.values() for w in pair]
    device = params[0].device
    gold = pack_answers(tokenizer, task, examples, final_answer_only).to(device)
    total = gold.mask.sum()
    order = torch.argsort(gold.mask.sum(1) + gold.attn[:, :gold.prompt_len].sum(1), stable=True).to(device)
    grads = [torch.zeros(p.shape, dtype=p.dtype, device=p.device) for p in params]
    for rows in order.split(batch):
        nll, _ = answer_nll(lm, trim_rows(gold, rows))
        targets = differentiable_weights(lm, params)
        for acc, g in zip(grads, torch.autograd.grad(nll / total, targets, allow_unused=True)):
            if g is not None:
                acc.add_(g)
    check_validation_gradient("validation_gradient", grads)
    return {name: LoRAGrad(grads[2 * i], grads[2 * i + 1]) for i, name in enumerate(layers)}


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
