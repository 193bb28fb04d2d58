"""Per-episode influence scores inside one ``loss.backward()`` over a peft LoRA model.

Each LoRA Linear's branch y = s * B (A x~) runs through ``_ScoredLoRA``, whose backward computes the
usual LoRA gradients and, from the same x~, h = A x~, g = dl/dy and gh = s * B^T g, adds each token's
influence (the op ``torch.ops.ippo.token_influence``) to a (N,) buffer. ``scorer.scores`` reduces that
buffer per episode:

    s_i = sum_layers sum_{t in i} [ gh_t . (V_A x~_t) + s * g_t . (V_B h_t) ] = < dl_i/dtheta , dL_val/dtheta >

for a loss that is the sum of per-episode losses, l = sum_i l_i. Positive s_i: a step on episode i
lowers the validation loss. Nothing per-episode wider than rank r is ever formed.

Going through the registered op (rather than the backend function) makes the scorer run the path that is
opcheck'd and traced by torch.compile, with the op's input checks; it costs about 20 us of Python per LoRA
layer per backward (dispatch and checks, measured on CPU).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer

from ippo.kernels.ops import accumulation_dtype, check_index_tensor, check_segment_ids, segment_sum

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


def validation_gradients(model: torch.nn.Module, val_loss: torch.Tensor) -> dict[str, LoRAGrad]:
    """{layer name: LoRAGrad(V_A, V_B)} = d val_loss / d (lora_A, lora_B) of the active adapter.

    Uses torch.autograd.grad, so the parameters' .grad are left as they were. Raises ValueError when that
    gradient is zero for every LoRA parameter (every score would be 0); one device sync.
    """
    layers = lora_linear_layers(model)
    params = []
    for name, layer in layers.items():
        adapter = active_adapter(name, layer)
        params += [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
    reaches = isinstance(val_loss, torch.Tensor) and val_loss.requires_grad
    grads = torch.autograd.grad(val_loss, params, allow_unused=True) if reaches else [None] * len(params)
    used = [g for g in grads if g is not None]
    if not used or not bool(torch.stack([g.ne(0).any() for g in used]).any()):
        raise ValueError("validation_gradients: the validation loss has zero gradient w.r.t. every LoRA parameter "
                         "(it does not reach the active adapter, or its gradient vanishes), so every influence score "
                         "would be 0; compute val_loss with the adapter enabled, from a forward that needs grad")
    grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
    return {name: LoRAGrad(grads[2 * i], grads[2 * i + 1]) for i, name in enumerate(layers)}


class _ScoredLoRA(torch.autograd.Function):
    """y = scaling * (x A^T) B^T; backward also adds the layer's per-token influence to the scorer."""

    @staticmethod
    def forward(ctx, x, weight_A, weight_B, scaling, site):
        h = F.linear(x, weight_A)
        ctx.save_for_backward(x, h, weight_A, weight_B)
        ctx.scaling, ctx.site = scaling, site
        return F.linear(h, weight_B) * scaling

    @staticmethod
    def backward(ctx, grad_y):
        x, h, weight_A, weight_B = ctx.saved_tensors
        dtype, s = h.dtype, ctx.scaling  # compute in the forward's dtype (autocast's, if any)
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        x2, h2 = x.reshape(-1, x.shape[-1]).to(dtype), h.reshape(-1, h.shape[-1])
        grad_h = (g @ weight_B.to(dtype)) * s
        ctx.site.add(x2, h2, g, grad_h)
        grad_x = (grad_h @ weight_A.to(dtype)).reshape(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_A = (grad_h.T @ x2).to(weight_A.dtype) if ctx.needs_input_grad[1] else None
        grad_B = ((g.T @ h2) * s).to(weight_B.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_A, grad_B, None, None


class _Site:
    """One scored LoRA layer: its name, validation gradient and scaling, and the scorer whose buffer it adds to."""

    def __init__(self, scorer: InfluenceScorer, name: str, val: LoRAGrad, scaling: float):
        self.scorer, self.name, self.val, self.scaling = scorer, name, val, scaling

    def add(self, x, h, grad_y, grad_h) -> None:
        """token_scores (N,) += this layer's per-token influence; x (N, d_in), h, grad_h (N, r), grad_y (N, d_out)."""
        self.scorer.token_scores.add_(torch.ops.ippo.token_influence(x, h, grad_y, grad_h, self.val.A, self.val.B,
                                                                     self.scaling))


class InfluenceScorer:
    """Context manager: per-episode influence scores from one backward over a peft LoRA model.

    model: has peft LoRA Linear layers (one active adapter, not merged, no DoRA).
    val_grads: {layer name: LoRAGrad(V_A (r, d_in), V_B (d_out, r))}, e.g. from ``validation_gradients``.
    segment_ids: integer tensor shaped like the batch's input_ids ((B, T), or (N,) packed): the episode
        of each token, -1 for padding or tokens to ignore. num_segments: episodes (default max id + 1).

    Run the forward *and* the backward of l = sum_i l_i inside the context; ``scores`` is then
    (num_segments,) float32 (float64 for a float64 model). The LoRA .grad values are the usual ones.
    With gradient checkpointing the re-run forward adds nothing: scores are taken in the backward only.
    A scorer is entered once, one scorer at a time per model; merging the adapter inside the context and
    inputs whose token dims differ from segment_ids' shape raise.
    """

    def __init__(self, model: torch.nn.Module, val_grads: Mapping[str, LoRAGrad], segment_ids: torch.Tensor,
                 num_segments: int | None = None):
        layers = lora_linear_layers(model)
        check_index_tensor(_OP, segment_ids)
        if num_segments is None:
            num_segments = int(segment_ids.max()) + 1 if segment_ids.numel() else 0
        check_segment_ids(_OP, segment_ids, num_segments)
        missing = sorted(set(layers) - set(val_grads))
        extra = sorted(set(val_grads) - set(layers))
        if missing or extra:
            raise ValueError(f"{_OP}: val_grads must have one entry per LoRA layer; missing {missing[:3]}"
                             f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
                             f"{'...' if len(extra) > 3 else ''}")
        self.sites: dict[str, tuple[LoraLinear, str, _Site]] = {}
        for name, layer in layers.items():
            adapter = active_adapter(name, layer)
            val = LoRAGrad(*val_grads[name])
            weights = {"A": layer.lora_A[adapter].weight, "B": layer.lora_B[adapter].weight}
            for (part, weight), got in zip(weights.items(), val):
                if not isinstance(got, torch.Tensor) or got.shape != weight.shape:
                    raise ValueError(f"{_OP}: val_grads[{name!r}].{part} must have shape {tuple(weight.shape)} "
                                     f"like lora_{part}.weight; got {tuple(getattr(got, 'shape', ()))}")
                if got.device != segment_ids.device:
                    raise ValueError(f"{_OP}: val_grads[{name!r}].{part} is on {got.device} but segment_ids is "
                                     f"on {segment_ids.device}; put both on the model's device")
            self.sites[name] = (layer, adapter, _Site(self, name, val, float(layer.scaling[adapter])))
        self.segment_shape = tuple(segment_ids.shape)
        self.segment_ids, self.num_segments = segment_ids.reshape(-1), num_segments
        acc = accumulation_dtype(*(t for _, _, site in self.sites.values() for t in site.val))
        self.token_scores = torch.zeros(segment_ids.numel(), dtype=acc, device=segment_ids.device)
        self.entered = False
        self.previous_forwards: dict[str, object] = {}

    @property
    def scores(self) -> torch.Tensor:
        """(num_segments,) influence of each episode on the validation loss (positive = helps)."""
        return segment_sum(self.token_scores, self.segment_ids, self.num_segments)

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
