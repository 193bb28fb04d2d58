"""Per-episode influence scores inside one ``loss.backward()`` over a peft LoRA model.

Each LoRA Linear's branch y = s * B (A x~) runs through ``_ScoredLoRA``, which folds the validation gradient
into the LoRA GEMMs the layer runs anyway: the forward's x~ [A; V_A]^T gives h = A x~ and V_A x~, the backward's
g [B, V_B] (g = dl/dy) gives B^T g (gh = s * B^T g) and V_B^T g, each from one read of x~ or g. The backward
computes the usual LoRA gradients and adds each token's influence, a combine of those rank-r tensors (the op
``torch.ops.ippo.lora_token_influence``), to a (N,) buffer. ``scorer.scores`` reduces that buffer per episode:

    s_i = sum_layers sum_{t in i} [ gh_t . (V_A x~_t) + s * (V_B^T g_t) . h_t ] = < dl_i/dtheta , dL_val/dtheta >

for a loss that is the sum of per-episode losses, l = sum_i l_i. Positive s_i: a step on episode i
lowers the validation loss. Nothing per-episode wider than rank r is ever formed. The 2r-wide GEMMs may round h
and gh differently from peft's r-wide ones, so the scored forward's output and the LoRA gradients equal a plain
forward+backward's to rounding (tested to 1e-12 relative in float64), not always bit for bit.

With ``sketch_dim=k`` the same backward also sketches every episode's whole LoRA gradient (the op
``torch.ops.ippo.gradient_sketches`` per layer, fused: no per-episode gradient and no (tokens x r x m)
tensor), so that ``scorer.sketches @ sketch_gradients(val_grads, k)`` estimates ``scorer.scores`` without
bias, and sketches can be stored and scored later against any other validation gradient.

Going through the registered ops (rather than the backend function) makes the scorer run the path that is
opcheck'd and traced by torch.compile, with the op's input checks; it costs about 20 us of Python per LoRA
layer per backward (dispatch and checks, measured on CPU). Concatenating [A; V_A] and [B, V_B] per call costs a
few us per layer (measured on CPU, against ms for the GEMMs at SmolLM2 widths), so it is not cached.
"""

from __future__ import annotations

import weakref
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer

from ippo.kernels import projection
from ippo.kernels.ops import (
    accumulation_dtype,
    check_index_tensor,
    check_segment_ids,
    segment_sum,
    sketch_lora_gradient,
)

_OP = "InfluenceScorer"


class LoRAGrad(NamedTuple):
    """Gradient of one LoRA layer: A: (r, d_in) like lora_A.weight, B: (d_out, r) like lora_B.weight."""

    A: torch.Tensor
    B: torch.Tensor


def active_adapter(name: str, layer: LoraLinear) -> str:
    """The one active adapter of peft LoRA layer ``name``; refuses merged layers, variants (DoRA) and a lora_B
    bias. Public: the benchmarks' baselines and ``ippo.testing`` use it too."""
    active = [a for a in layer.active_adapters if a in layer.lora_A.keys()]
    if len(active) != 1:
        raise ValueError(f"{_OP}: LoRA layer {name} must have exactly one active adapter; got {active}")
    adapter = active[0]
    if layer.merged:
        raise ValueError(f"{_OP}: LoRA layer {name} is merged into its base weight; unmerge it first")
    if adapter in getattr(layer, "lora_variant", {}):
        raise ValueError(f"{_OP}: LoRA layer {name} uses a variant (e.g. DoRA); only plain LoRA is supported")
    if layer.lora_B[adapter].bias is not None:
        raise ValueError(f"{_OP}: LoRA layer {name} has a lora_B bias; only plain LoRA is supported")
    return adapter


def lora_linear_layers(model: torch.nn.Module) -> dict[str, LoraLinear]:
    """The peft LoRA Linear layers of ``model`` by module name; other LoRA layer types are refused.
    Public: the benchmarks' baselines and ``ippo.testing`` use it too."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            layers[name] = module
        elif isinstance(module, LoraLayer):
            raise ValueError(f"{_OP}: LoRA layer {name} is a {type(module).__name__}; only Linear LoRA is "
                             "supported")
    if not layers:
        raise ValueError(f"{_OP}: model has no peft LoRA Linear layers")
    return layers


def lora_weights(model: torch.nn.Module) -> dict[str, LoRAGrad]:
    """{layer name: (lora_A.weight (r, d_in), lora_B.weight (d_out, r))} of the active adapter of every peft LoRA
    Linear of ``model``, in ``named_modules()`` order: the parameters themselves, in a LoRAGrad pair (one lookup for
    every trainer that integrates the scorer; checks as in ``active_adapter`` and ``lora_linear_layers``)."""
    weights = {}
    for name, layer in lora_linear_layers(model).items():
        adapter = active_adapter(name, layer)
        weights[name] = LoRAGrad(layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)
    return weights


def check_validation_gradient(op: str, grads) -> None:
    """ValueError from ``op`` unless the validation gradient ``grads`` (tensors, None = not reached) is finite and
    non-zero somewhere: a zero one would make every influence score 0, a non-finite one every score NaN. One
    device sync."""
    used = [g for g in grads if g is not None]
    if used:
        finite = torch.stack([g.isfinite().all() for g in used]).all()
        nonzero = torch.stack([g.ne(0).any() for g in used]).any()
        finite, nonzero = torch.stack([finite, nonzero]).tolist()
    if not used or not nonzero or not finite:
        what = "zero" if not used or (finite and not nonzero) else "not finite"
        raise ValueError(f"{op}: the validation gradient is {what} for every LoRA parameter (the validation loss does "
                         f"not reach the active adapter, its gradient vanishes, or it overflows), so every influence "
                         f"score would be {'0' if what == 'zero' else 'NaN'}; compute the validation loss with the "
                         "adapter enabled, from a forward that needs grad")


def segment_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) int64 segment ids of a batch with one episode per row: b on row b's tokens (attention_mask != 0),
    -1 on padding; what ``InfluenceScorer`` takes."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(f"segment_ids_from_mask: attention_mask must be a (B, T) tensor; got "
                         f"{tuple(getattr(attention_mask, 'shape', ()))}")
    rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)[:, None]
    return rows.expand(attention_mask.shape).masked_fill(attention_mask == 0, -1).contiguous()


def sketch_layer_index(names) -> dict[str, int]:
    """{layer name: its projection index} for the whole-model sketch: the position of the layer in ``names``.

    The scorer passes ``lora_linear_layers(model)`` (the model's ``named_modules()`` order, which is also the
    order of ``validation_gradients``' dict), and ``sketch_gradients`` its dict's keys, so both use the same
    per-layer projections when the dict comes from ``validation_gradients`` (or pass ``model=`` to it)."""
    return {name: i for i, name in enumerate(names)}


def check_sketch_dim(op: str, sketch_dim, ranks: Mapping[str, int]) -> None:
    """sketch_dim a positive multiple of 2r for the rank r of every layer (ranks: {layer: r})."""
    bad = {name: r for name, r in ranks.items() if isinstance(sketch_dim, int) and sketch_dim % (2 * r)}
    if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int) or sketch_dim <= 0 or bad:
        needed = sorted({2 * r for r in ranks.values()})
        raise ValueError(f"{op}: sketch_dim must be a positive int, a multiple of 2 * r for every LoRA layer's rank r "
                         f"(2r in {needed}); got {sketch_dim!r}"
                         + (f", not a multiple for layer {next(iter(bad))} (r = {next(iter(bad.values()))})"
                            if bad else ""))


def check_sketch_seed(op: str, seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < projection.SEED_LIMIT:
        raise ValueError(f"{op}: sketch_seed must be an int in [0, 2**63); got {seed!r}")


def sketch_gradients(grads: Mapping[str, LoRAGrad], k: int, seed: int = 0, *,
                     model: torch.nn.Module | None = None) -> torch.Tensor:
    """(k,) whole-model sketch of a dense LoRA gradient {layer: LoRAGrad(A (r, d_in), B (d_out, r))}, e.g. from
    ``validation_gradients``: the sum over layers of ``sketch_lora_gradient(A, B, k, seed, layer=i)``, i the
    layer's position in ``grads`` (``sketch_layer_index``), the projection ``InfluenceScorer(..., sketch_dim=k,
    sketch_seed=seed)`` uses. So ``scorer.sketches @ sketch_gradients(val_grads, k, seed)`` is an unbiased
    estimate of ``scorer.scores`` (error ~ 1/sqrt(k)). float32, float64 if any gradient is float64.

    With ``model``, the layer order is the model's and ``grads`` must have exactly its LoRA layers (ValueError
    otherwise); without it, ``grads`` must be in the model's ``named_modules()`` order, as
    ``validation_gradients`` returns it."""
    op = "sketch_gradients"
    if not grads:
        raise ValueError(f"{op}: grads is empty; pass {{layer name: LoRAGrad(A, B)}} for every LoRA layer")
    names = list(grads)
    if model is not None:
        layers = list(lora_linear_layers(model))
        missing, extra = sorted(set(layers) - set(names)), sorted(set(names) - set(layers))
        if missing or extra:
            raise ValueError(f"{op}: grads must have one entry per LoRA layer of model; missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        names = layers
    ranks = {name: LoRAGrad(*grads[name]).A.shape[0] for name in names}
    check_sketch_dim(op, k, ranks)
    check_sketch_seed(op, seed)
    acc = accumulation_dtype(*(t for name in names for t in grads[name]))
    total = None
    for name, index in sketch_layer_index(names).items():
        grad = LoRAGrad(*grads[name])
        part = sketch_lora_gradient(grad.A, grad.B, k, seed, index).to(acc)
        total = part if total is None else total + part
    return total


def _fsdp2_unsharded(params: list[torch.Tensor], model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """{id(sharded parameter): its unsharded parameter} for the FSDP2 (``fully_shard``) parameters of ``model``.

    Under FSDP2 a LoRA weight is a sharded DTensor parameter; inside the forward its module holds the all-gathered
    full tensor (a plain ``nn.Parameter``, FSDP2's ``_unsharded_param``), which is the leaf the autograd graph
    records. Differentiating with respect to it (rather than the sharded parameter, which the graph never sees)
    gives the full gradient of the loss of this process, with no reduce-scatter and ``.grad`` untouched; FSDP2's
    own backward hooks all-gather the parameters again where the backward needs them. The lookup goes through
    FSDP2's per-module state (``FSDPModule._get_fsdp_state()``, private in torch 2.13), so it is checked: a DTensor
    parameter that no ``fully_shard`` state owns (tensor parallelism, FSDP1, ...) is a ValueError."""
    from torch.distributed.tensor import DTensor

    sharded = {id(p) for p in params if isinstance(p, DTensor)}
    if not sharded:
        return {}
    found: dict[int, torch.Tensor] = {}
    try:
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                for group in module._get_fsdp_state()._fsdp_param_groups:
                    for fsdp_param in group.fsdp_params:
                        if id(fsdp_param.sharded_param) in sharded and hasattr(fsdp_param, "_unsharded_param"):
                            found[id(fsdp_param.sharded_param)] = fsdp_param._unsharded_param
    except (ImportError, AttributeError) as error:  # FSDP2's internals moved: say so rather than return zeros
        raise ValueError(f"validation_gradients: the LoRA parameters are DTensors, and this torch's FSDP2 state "
                         f"cannot be read ({type(error).__name__}: {error}); supported: FSDP2 (fully_shard) as in "
                         "torch 2.13") from error
    missing = len(sharded - set(found))
    if missing:
        raise ValueError(f"validation_gradients: {missing} LoRA parameter(s) are DTensors not sharded by FSDP2 "
                         "(fully_shard), or not yet all-gathered by a forward; supported: plain parameters (1 "
                         "process, DDP) and FSDP2, with the loss computed by a forward of the model")
    return found


def differentiable_weights(model: torch.nn.Module, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors to pass to ``torch.autograd.grad`` for the gradient with respect to ``params`` (LoRA weights of
    ``model``) of a loss computed by a forward of ``model``: the parameters themselves, or under FSDP2 their
    unsharded (all-gathered, full) parameters (``_fsdp2_unsharded``), so that the gradients are full plain tensors.
    Call it after the forward."""
    unsharded = _fsdp2_unsharded(params, model)
    return [unsharded.get(id(p), p) for p in params]


def validation_gradients(model: torch.nn.Module, val_loss: torch.Tensor) -> dict[str, LoRAGrad]:
    """{layer name: LoRAGrad(V_A, V_B)} = d val_loss / d (lora_A, lora_B) of the active adapter.

    Uses torch.autograd.grad, so the parameters' .grad are left as they were. Raises ValueError when that
    gradient is zero for every LoRA parameter (every score would be 0); one device sync.

    The gradient is this process's, of ``val_loss`` alone: nothing is communicated (as under DDP). With the LoRA
    parameters sharded by FSDP2 (``fully_shard``: DTensors), it is taken with respect to the full, all-gathered
    weights the forward used (``differentiable_weights``), so every process gets the full V of the unsharded model
    as plain tensors, which ``InfluenceScorer`` takes; the same loss on every process gives the same V everywhere
    (to sum different shares, all-reduce the result). ``val_loss`` must come from a forward of ``model``.
    """
    layers = lora_weights(model)
    params = [w for pair in layers.values() for w in pair]
    reaches = isinstance(val_loss, torch.Tensor) and val_loss.requires_grad
    targets = differentiable_weights(model, params) if reaches else params
    grads = torch.autograd.grad(val_loss, targets, allow_unused=True) if reaches else [None] * len(params)
    check_validation_gradient("validation_gradients", grads)
    grads = [torch.zeros(p.shape, dtype=p.dtype, device=p.device) if g is None else g.detach()
             for p, g in zip(params, grads)]
    return {name: LoRAGrad(grads[2 * i], grads[2 * i + 1]) for i, name in enumerate(layers)}


class _ScoredLoRA(torch.autograd.Function):
    """y = scaling * (x A^T) B^T, plus the layer's per-token influence added to the scorer in the backward.

    With a validation gradient (V_A, V_B) the LoRA GEMMs carry it: the forward runs x [A; V_A]^T (N, 2r), giving
    h = x A^T and x V_A^T from one read of x, and the backward grad_y [B, V_B] (N, 2r), giving grad_y B and
    grad_y V_B from one read of grad_y; the influence is then a combine of (N, r) tensors
    (``torch.ops.ippo.lora_token_influence``). V enters the GEMMs in the LoRA weights' dtype (that of
    ``validation_gradients``), so a float64 V on a float32 model scores with float32 products. x is kept for the
    backward only when the LoRA weight gradients or the sketches need it."""

    @staticmethod
    def forward(ctx, x, weight_A, weight_B, scaling, site):
        scorer = site.scorer
        weight = weight_A if site.val is None else torch.cat([weight_A, site.val.A.to(weight_A.dtype)])
        hv = F.linear(x, weight)  # (..., r) = h, or (..., 2r) = [h, x V_A^T]
        keep_x = (scorer.sketch_dim is not None or scorer.episode_grads
                  or (scorer.lora_grads and ctx.needs_input_grad[1]))
        ctx.save_for_backward(x if keep_x else None, hv, weight_A, weight_B)
        ctx.scaling, ctx.site, ctx.x_shape, ctx.x_dtype = scaling, site, x.shape, x.dtype
        return F.linear(hv[..., :weight_A.shape[0]], weight_B) * scaling

    @staticmethod
    def backward(ctx, grad_y):
        x, hv, weight_A, weight_B = ctx.saved_tensors
        site, s, r = ctx.site, ctx.scaling, weight_A.shape[0]
        dtype = hv.dtype  # compute in the forward's dtype (autocast's, if any)
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        hv = hv.reshape(-1, hv.shape[-1])
        h = hv[:, :r]
        if site.val is None:
            grad_h = (g @ weight_B.to(dtype)) * s
        else:
            gv = g @ torch.cat([weight_B, site.val.B.to(weight_B.dtype)], 1).to(dtype)  # (N, 2r) = [g B, g V_B]
            grad_h = gv[:, :r] * s
            site.add_scores(h, hv[:, r:], gv[:, r:], grad_h)
        x2 = None if x is None else x.reshape(-1, x.shape[-1]).to(dtype)
        if site.scorer.sketch_dim is not None:
            site.add_sketches(x2, h, g, grad_h)
        if site.scorer.episode_grads:
            site.add_episode_grads(x2, h, g, grad_h)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_h @ weight_A.to(dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        lora_grads = site.scorer.lora_grads  # False: scoring only, the two weight-gradient GEMMs are skipped
        grad_A = (grad_h.T @ x2).to(weight_A.dtype) if lora_grads and ctx.needs_input_grad[1] else None
        grad_B = ((g.T @ h) * s).to(weight_B.dtype) if lora_grads and ctx.needs_input_grad[2] else None
        return grad_x, grad_A, grad_B, None, None


class _Site:
    """One scored LoRA layer: its name, validation gradient (or None), scaling and sketch projection index, and
    the scorer whose buffers it adds to."""

    def __init__(self, scorer: InfluenceScorer, name: str, val: LoRAGrad | None, scaling: float, index: int):
        # a weak reference: the scorer holds its sites, and a site holding the scorer would make a reference cycle
        # that keeps the scorer's buffers (episode_grads: rows x LoRA parameters) alive until the cycle collector
        self.scorer = weakref.proxy(scorer)
        self.name, self.val, self.scaling, self.index = name, val, scaling, index

    def add_scores(self, h, x_va, g_vb, grad_h) -> None:
        """The scorer's (N,) token buffer += this layer's per-token influence; all (N, r): h = x A^T,
        x_va = x V_A^T, g_vb = grad_y V_B, grad_h = s grad_y B."""
        self.scorer._token_buffer.add_(torch.ops.ippo.lora_token_influence(h, x_va, g_vb, grad_h, self.scaling))

    def add_sketches(self, x, h, grad_y, grad_h) -> None:
        """The scorer's (S, k) sketches += this layer's; x (N, d_in), h, grad_h (N, r), grad_y (N, d_out)."""
        scorer = self.scorer
        scorer._sketch_buffer.add_(torch.ops.ippo.gradient_sketches(
            x, h, grad_y, grad_h, scorer.segment_ids, scorer.num_segments, scorer.sketch_dim, scorer.sketch_seed,
            self.index, self.scaling))

    def add_episode_grads(self, x, h, grad_y, grad_h) -> None:
        """The scorer's per-episode gradients of this layer += ``segment_lora_gradients`` (S, r, d_in), (S, d_out, r);
        x (N, d_in), h, grad_h (N, r), grad_y (N, d_out)."""
        scorer = self.scorer
        grads = LoRAGrad(*torch.ops.ippo.segment_lora_gradients(x, h, grad_y, grad_h, scorer.segment_ids,
                                                                scorer.num_segments, self.scaling))
        held = scorer._episode_buffers.get(self.name)
        scorer._episode_buffers[self.name] = grads if held is None else LoRAGrad(*(a + b for a, b in zip(held, grads)))


class InfluenceScorer:
    """Context manager: per-episode influence scores, per-token scores and gradient sketches from one backward
    over a peft LoRA model.

    model: has peft LoRA Linear layers (one active adapter, not merged, no DoRA).
    val_grads: {layer name: LoRAGrad(V_A (r, d_in), V_B (d_out, r))}, e.g. from ``validation_gradients``; None
        when only sketches are wanted (then ``sketch_dim`` is required).
    segment_ids: integer tensor shaped like the batch's input_ids ((B, T), or (N,) packed): the episode
        of each token, -1 for padding or tokens to ignore. num_segments: episodes (default max id + 1).
    sketch_dim: k, to also sketch each episode's gradient over all LoRA layers (a positive multiple of 2r for
        every layer's rank r); sketch_seed: the projection's seed (an int in [0, 2**63)).
    lora_grads: False = scoring only: the LoRA weight-gradient GEMMs are skipped and the LoRA .grad are left
        untouched (gradients still flow to everything below the LoRA layers).
    episode_grads: True = also form every episode's LoRA weight gradient in the backward (segmented GEMMs, the
        FLOPs of the dense weight gradient; memory num_segments x the LoRA parameters), for a trainer that weights
        episodes by their scores after one backward (``weighted_gradient``).

    Run the forward *and* the backward of l = sum_i l_i inside the context; then (float32, or float64 for a
    float64 model):

    * ``scores``: (num_segments,) s_i = < dl_i/dtheta, V > (needs val_grads).
    * ``token_scores``: shaped like segment_ids, the part of s_i that the backward brings through token t's
      position (the per-token terms of the math in the module docstring); 0 on ignored tokens, and they sum
      to ``scores`` over each episode. Through attention, position t's gradient carries the losses of t and of
      later tokens, so this attributes the score to where the gradient meets the LoRA weights, not to which
      token's loss produced it.
    * ``sketches``: (num_segments, k), the sketch of each episode's gradient over all LoRA layers: the sum of
      the layer sketches of ``gradient_sketches``, layer i of ``sketch_layer_index(lora_linear_layers(model))``
      using projection index i (independent projections per layer). ``sketches @ sketch_gradients(val_grads,
      k, sketch_seed)`` estimates ``scores`` without bias, so a trainer can store ``sketches`` per iteration
      (with ``sketch_layers``, the layer names in projection order, and the seed) and score them later.
    * ``episode_gradients`` (episode_grads=True): {layer: LoRAGrad(A (S, r, d_in), B (S, d_out, r))}, dl_i/dtheta
      per episode i (``segment_lora_gradients``), so that sum_layers <G_i, V> = ``scores``[i];
      ``weighted_gradient(w)`` = sum_i w_i dl_i/dtheta.

    With lora_grads=True (default) the LoRA .grad values are the usual ones. With gradient checkpointing the
    re-run forward adds nothing: everything is taken in the backward only. A scorer is entered once, one scorer
    at a time per model; merging the adapter inside the context and inputs whose token dims differ from
    segment_ids' shape raise.
    """

    def __init__(self, model: torch.nn.Module, val_grads: Mapping[str, LoRAGrad] | None, segment_ids: torch.Tensor,
                 num_segments: int | None = None, *, sketch_dim: int | None = None, sketch_seed: int = 0,
                 lora_grads: bool = True, episode_grads: bool = False):
        layers = lora_linear_layers(model)
        check_index_tensor(_OP, segment_ids)
        if num_segments is None:
            num_segments = int(segment_ids.max()) + 1 if segment_ids.numel() else 0
        check_segment_ids(_OP, segment_ids, num_segments)
        if val_grads is None and sketch_dim is None:
            raise ValueError(f"{_OP}: nothing to compute: val_grads is None and sketch_dim is None; pass validation "
                             "gradients for scores, sketch_dim=k for sketches, or both")
        if val_grads is not None:
            missing = sorted(set(layers) - set(val_grads))
            extra = sorted(set(val_grads) - set(layers))
            if missing or extra:
                raise ValueError(f"{_OP}: val_grads must have one entry per LoRA layer; missing {missing[:3]}"
                                 f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
                                 f"{'...' if len(extra) > 3 else ''}")
        adapters = {name: active_adapter(name, layer) for name, layer in layers.items()}
        if sketch_dim is not None:
            check_sketch_dim(_OP, sketch_dim, {name: layer.r[adapters[name]] for name, layer in layers.items()})
            check_sketch_seed(_OP, sketch_seed)
        for flag, value in (("lora_grads", lora_grads), ("episode_grads", episode_grads)):
            if not isinstance(value, bool):
                raise ValueError(f"{_OP}: {flag} must be True or False; got {value!r}")
        self.sketch_dim, self.sketch_seed, self.lora_grads = sketch_dim, sketch_seed, lora_grads
        self.episode_grads = episode_grads
        self._episode_buffers: dict[str, LoRAGrad] = {}
        self.sketch_layers = tuple(layers)  # projection index i = position here (sketch_layer_index)
        self.sites: dict[str, tuple[LoraLinear, str, _Site]] = {}
        weights_seen = []
        for index, ((name, layer), pair) in enumerate(zip(layers.items(), lora_weights(model).values())):
            adapter = adapters[name]
            weights = dict(zip("AB", pair))
            weights_seen += pair
            val = None
            if val_grads is not None:
                val = LoRAGrad(*val_grads[name])
                for (part, weight), got in zip(weights.items(), val):
                    if not isinstance(got, torch.Tensor) or got.shape != weight.shape:
                        raise ValueError(f"{_OP}: val_grads[{name!r}].{part} must have shape {tuple(weight.shape)} "
                                         f"like lora_{part}.weight; got {tuple(getattr(got, 'shape', ()))}")
                    if got.device != segment_ids.device:
                        raise ValueError(f"{_OP}: val_grads[{name!r}].{part} is on {got.device} but segment_ids is "
                                         f"on {segment_ids.device}; put both on the model's device")
            self.sites[name] = (layer, adapter, _Site(self, name, val, float(layer.scaling[adapter]), index))
        self.segment_shape = tuple(segment_ids.shape)
        self.segment_ids, self.num_segments = segment_ids.reshape(-1), num_segments
        if val_grads is not None:
            acc = accumulation_dtype(*(t for _, _, site in self.sites.values() for t in site.val))
        else:
            acc = accumulation_dtype(*weights_seen)
        self.has_scores = val_grads is not None
        self._token_buffer = torch.zeros(segment_ids.numel(), dtype=acc, device=segment_ids.device)
        self._sketch_buffer = (torch.zeros((num_segments, sketch_dim), dtype=acc, device=segment_ids.device)
                               if sketch_dim is not None else None)
        self.entered = False
        self.previous_forwards: dict[str, object] = {}

    def _need_scores(self, what: str) -> None:
        if not self.has_scores:
            raise RuntimeError(f"{_OP}: {what} needs validation gradients; this scorer was made with val_grads=None "
                               "(sketches only)")

    @property
    def scores(self) -> torch.Tensor:
        """(num_segments,) influence of each episode on the validation loss (positive = helps)."""
        self._need_scores("scores")
        return segment_sum(self._token_buffer, self.segment_ids, self.num_segments)

    @property
    def token_scores(self) -> torch.Tensor:
        """Per-token influence, shaped like segment_ids: token t's share of its episode's score (the terms
        gh_t . (V_A x_t) + s g_t . (V_B h_t) summed over layers); 0 where segment_ids is -1. Summed over an
        episode's tokens it gives ``scores`` (up to rounding). See the class docstring for what it attributes."""
        self._need_scores("token_scores")
        values = torch.where(self.segment_ids >= 0, self._token_buffer, torch.zeros_like(self._token_buffer))
        return values.reshape(self.segment_shape)

    @property
    def sketches(self) -> torch.Tensor:
        """(num_segments, sketch_dim) whole-model gradient sketch of each episode (see the class docstring)."""
        if self._sketch_buffer is None:
            raise RuntimeError(f"{_OP}: sketches need sketch_dim=k; this scorer was made without it")
        return self._sketch_buffer.clone()

    @property
    def episode_gradients(self) -> dict[str, LoRAGrad]:
        """{layer: LoRAGrad(A (S, r, d_in), B (S, d_out, r))}: each episode's gradient of its loss with respect to
        the layer's lora_A / lora_B weights, in the model's layer order; zeros for a layer the backward did not
        reach. float32, float64 for a float64 model (the accumulation dtype of the backward's inputs)."""
        if not self.episode_grads:
            raise RuntimeError(f"{_OP}: episode_gradients need episode_grads=True; this scorer was made without it")
        out = {}
        for name, (layer, adapter, _) in self.sites.items():
            held = self._episode_buffers.get(name)
            if held is None:
                A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                held = LoRAGrad(*(torch.zeros((self.num_segments, *w.shape), dtype=accumulation_dtype(w),
                                              device=w.device) for w in (A, B)))
            out[name] = held
        return out

    def weighted_gradient(self, weights: torch.Tensor) -> dict[str, LoRAGrad]:
        """{layer: LoRAGrad(sum_i w_i dl_i/dA, sum_i w_i dl_i/dB)} for (num_segments,) ``weights``: the gradient of
        sum_i w_i l_i (needs episode_grads=True). Episodes with w_i = 0 are left out, not multiplied by 0, so a
        non-finite gradient of a dropped episode never reaches the sum."""
        if not isinstance(weights, torch.Tensor) or weights.shape != (self.num_segments,):
            raise ValueError(f"{_OP}: weights must be a ({self.num_segments},) tensor, one per episode; got "
                             f"{tuple(getattr(weights, 'shape', ())) or type(weights).__name__}")
        used = weights.ne(0).nonzero().squeeze(1)
        out = {}
        for name, grads in self.episode_gradients.items():
            w = weights[used].to(grads.A.dtype)
            out[name] = LoRAGrad(*(torch.tensordot(w, g.index_select(0, used), dims=1) for g in grads))
        return out

    def __enter__(self) -> InfluenceScorer:
        if self.entered:
            raise RuntimeError(f"{_OP}: this scorer was already entered, and its scores would add up over both "
                               "backwards; create a new InfluenceScorer for each scored backward")
        busy = [name for name, (layer, _, _) in self.sites.items()
                if isinstance(vars(layer).get("forward"), _ScoredForward)]
        if busy:
            raise RuntimeError(f"{_OP}: LoRA layer {busy[0]} is already scored by another active InfluenceScorer; "
                               "nested scorers are not supported: exit the other one first")
        self.entered = True
        for name, (layer, adapter, site) in self.sites.items():
            self.previous_forwards[name] = vars(layer).get("forward")  # an instance forward (e.g. a hook), or None
            layer.forward = _ScoredForward(layer, adapter, site)
        return self

    def __exit__(self, *exc) -> None:
        for name, (layer, _, _) in self.sites.items():
            previous = self.previous_forwards.pop(name)
            if previous is None:
                del layer.forward  # the class's forward shows through again
            else:
                layer.forward = previous


class _ScoredForward:
    """peft's vanilla-LoRA forward of one layer with the LoRA branch through ``_ScoredLoRA``: the layer's
    instance ``forward`` while its scorer is active."""

    def __init__(self, layer: LoraLinear, adapter: str, site: _Site):
        self.layer, self.adapter, self.site = layer, adapter, site

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer, adapter, site = self.layer, self.adapter, self.site
        if layer.disable_adapters:
            return type(layer).forward(layer, x, *args, **kwargs)
        if kwargs.get("adapter_names") is not None:
            raise ValueError(f"{_OP}: mixed-adapter batches (adapter_names) are not supported")
        if layer.merged:
            raise RuntimeError(f"{_OP}: LoRA layer {site.name} was merged into its base weight inside the scorer's "
                               "context (merge_adapter), so its forward would count the adapter twice; merge after "
                               "the scored backward")
        tokens, expected = tuple(x.shape[:-1]), site.scorer.segment_shape
        if tokens != expected and not (len(expected) == 1 and tokens == (1, *expected)):
            raise ValueError(f"{_OP}: LoRA layer {site.name} got input of shape {tuple(x.shape)}, i.e. tokens "
                             f"{tokens}, but segment_ids has shape {expected}; pass segment_ids shaped like the "
                             "batch's input_ids")
        result = layer.base_layer(x, *args, **kwargs)
        lora_A = layer.lora_A[adapter]
        x_lora = layer.lora_dropout[adapter](layer._cast_input_dtype(x, lora_A.weight.dtype))
        lora_out = _ScoredLoRA.apply(x_lora, lora_A.weight, layer.lora_B[adapter].weight, site.scaling, site)
        return (result + lora_out).to(result.dtype)
