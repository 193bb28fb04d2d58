"""The other ways to get per-episode gradient . validation-gradient scores, for the benchmarks and comparison.

Each function scores the episodes of ``batch`` = (input_ids (E, T), advantages (E,)), one episode filling
each row, with l_i = ``full_row_losses`` and ``val_grads`` from ``validation_gradients``; it returns (E,)
float32 scores (float64 for a float64 model) and leaves the LoRA .grad values as the plain backward of
sum_i l_i sets them (except ``per_episode_loop`` and ``vmap_per_sample``, which take no step).

* ``influence_scorer``: ours, in the plain backward.
* ``influence_scorer_sketched``: ours with ``sketch_dim=SKETCH_K``: the exact scores *and* every episode's
  whole-model sketch from the same backward; returns the sketched estimate ``sketches @ sketch_gradients(V)``.
* ``sketches_only``: ``InfluenceScorer(model, None, ..., sketch_dim=SKETCH_K)``: sketches, no scores.
* ``scoring_only``: ours with ``lora_grads=False`` (the LoRA weight-gradient GEMMs skipped, .grad untouched).
* ``per_episode_loop``: the published prototype: a backward per episode (``ippo.testing.per_episode_loop``).
* ``vmap_per_sample``: torch.func per-sample gradients of the LoRA parameters, then dot products.
* ``ghost_hooks``: eager hooks, "reduced ghost" inner products: per token (x V^T) . grad_out per Linear.
* ``logra_hooks``: eager hooks, LoGra-style two-sided Gaussian projection (k x k per Linear), then dot
  products of the sketches (an estimate, not exact). At its default k = 16 per side a LoRA layer (two
  Linears) gets 2 x 16 x 16 = 512 numbers per episode: the width ``SKETCH_K`` of ours.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.func import functional_call, grad, vmap

from ippo import testing
from ippo.kernels import InfluenceScorer, sketch_gradients
from ippo.kernels.ops import accumulation_dtype
from ippo.testing import episode_losses, lora_pairs, next_token_targets
from ippo.train.ppo_math import token_logprobs


def full_row_losses(model, input_ids, advantages):
    """(E,) l_i = -A_i sum_t log p(token t+1 | tokens <= t) of episodes that fill their rows (no padding)."""
    return episode_losses(model, input_ids, *next_token_targets(input_ids, advantages))


def _acc(val_grads) -> torch.dtype:
    return accumulation_dtype(*(t for val in val_grads.values() for t in val))


def influence_scorer(model, batch, val_grads):
    input_ids, advantages = batch
    segment_ids = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)
    with InfluenceScorer(model, val_grads, segment_ids) as scorer:
        full_row_losses(model, input_ids, advantages).sum().backward()
    return scorer.scores


SKETCH_K = 512  # per episode, whole model; the LoGra hooks' default k = 16 per side gives 512 per LoRA layer


def _segments(input_ids):
    return torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)


def influence_scorer_sketched(model, batch, val_grads, k: int = SKETCH_K, seed: int = 0):
    input_ids, advantages = batch
    with InfluenceScorer(model, val_grads, _segments(input_ids), sketch_dim=k, sketch_seed=seed) as scorer:
        full_row_losses(model, input_ids, advantages).sum().backward()
    return scorer.sketches @ sketch_gradients(val_grads, k, seed, model=model)


def sketches_only(model, batch, val_grads, k: int = SKETCH_K, seed: int = 0):
    input_ids, advantages = batch
    with InfluenceScorer(model, None, _segments(input_ids), sketch_dim=k, sketch_seed=seed) as scorer:
        full_row_losses(model, input_ids, advantages).sum().backward()
    return scorer.sketches @ sketch_gradients(val_grads, k, seed, model=model)


def scoring_only(model, batch, val_grads):
    input_ids, advantages = batch
    with InfluenceScorer(model, val_grads, _segments(input_ids), lora_grads=False) as scorer:
        full_row_losses(model, input_ids, advantages).sum().backward()
    return scorer.scores


def per_episode_loop(model, batch, val_grads):
    input_ids, advantages = batch
    return testing.per_episode_loop(model, val_grads, input_ids, *next_token_targets(input_ids, advantages))


def vmap_per_sample(model, batch, val_grads):
    input_ids, advantages = batch
    pairs = lora_pairs(model, val_grads)
    names = {id(p): n for n, p in model.named_parameters()}
    params = {names[id(m.weight)]: m.weight.detach() for m, _ in pairs}

    def loss_one(p, ids, adv):
        logits = functional_call(model, p, args=(), kwargs={"input_ids": ids[None]}).logits
        return -adv * token_logprobs(logits[:, :-1], ids[None, 1:]).sum()

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")(params, input_ids, advantages)
    acc = _acc(val_grads)
    return sum(per_sample[names[id(m.weight)]].flatten(1).to(acc) @ v.flatten().to(acc) for m, v in pairs)


class _Hooks:
    """Forward hooks keep each Linear's (transformed) input; backward hooks turn it into per-token values."""

    def __init__(self, pairs, on_input, on_grad):
        self.saved, self.handles = {}, []
        def rows(t):
            return t.reshape(-1, t.shape[-1])

        for module, val in pairs:
            self.handles.append(module.register_forward_hook(
                lambda m, inp, out, val=val: self.saved.__setitem__(m, on_input(m, rows(inp[0]), val))))
            self.handles.append(module.register_full_backward_hook(
                lambda m, g_in, g_out, val=val: on_grad(m, self.saved.pop(m), rows(g_out[0]), val)))

    def __enter__(self):
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        # The first layers' inputs need no gradient; the hook still gets grad_output, which is all it uses.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self._warnings.__exit__(*exc)


def ghost_hooks(model, batch, val_grads):
    """<dl_i/dW, V> = sum_{t in i} grad_out_t . (V x_t), for W = each lora_A and lora_B weight."""
    input_ids, advantages = batch
    acc = _acc(val_grads)
    token_scores = torch.zeros(input_ids.numel(), dtype=acc, device=input_ids.device)

    def on_input(module, x, val):
        return x.to(acc) @ val.to(acc).T  # (N, d_out): V x_t, the only thing kept

    def on_grad(module, v_x, grad_out, val):
        token_scores.add_((v_x * grad_out.to(acc)).sum(-1))

    with _Hooks(lora_pairs(model, val_grads), on_input, on_grad):
        full_row_losses(model, input_ids, advantages).sum().backward()
    return token_scores.view(input_ids.shape).sum(1)


def logra_hooks(model, batch, val_grads, k: int = 16, seed: int = 0):
    """LoGra-style: per Linear, Gaussian P_in (k, d_in), P_out (k, d_out) with E[P^T P] = I; per episode
    S_i = sum_t (P_out g_t)(P_in x_t)^T (k x k); score = sum over Linears of <S_i, P_out V P_in^T>."""
    input_ids, advantages = batch
    acc, device = _acc(val_grads), input_ids.device
    episodes, tokens = input_ids.shape
    generator = torch.Generator(device="cpu").manual_seed(seed)
    projections = {}
    for module, _ in lora_pairs(model, val_grads):
        d_out, d_in = module.weight.shape
        projections[module] = tuple(torch.randn(k, d, generator=generator, dtype=acc).to(device) / math.sqrt(k)
                                    for d in (d_in, d_out))
    scores = torch.zeros(episodes, dtype=acc, device=device)

    def on_input(module, x, val):
        return x.to(acc) @ projections[module][0].T  # (N, k)

    def on_grad(module, px, grad_out, val):
        p_in, p_out = projections[module]
        pg = grad_out.to(acc) @ p_out.T  # (N, k)
        sketches = torch.einsum("eti,etj->eij", pg.view(episodes, tokens, k), px.view(episodes, tokens, k))
        scores.add_((sketches * (p_out @ val.to(acc) @ p_in.T)).sum((1, 2)))

    with _Hooks(lora_pairs(model, val_grads), on_input, on_grad):
        full_row_losses(model, input_ids, advantages).sum().backward()
    return scores


METHODS = {"scorer": influence_scorer, "per-episode loop": per_episode_loop, "vmap per-sample": vmap_per_sample,
           "ghost hooks": ghost_hooks, "logra hooks": logra_hooks, "scorer+sketch": influence_scorer_sketched,
           "sketches only": sketches_only, "scorer, no LoRA grads": scoring_only}
