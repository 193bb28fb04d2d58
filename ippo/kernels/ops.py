"""The torch ops ``token_influence``, ``influence_scores``, ``lora_token_influence``, ``gradient_sketches`` and
``segment_lora_gradients``: argument checks, torch.library registration, and the segment bookkeeping shared by
every backend (``segment_sum``, ``segment_order``; the sketch's per-episode reduction itself is each backend's fused
``segment_sketch``).

Each op checks its own inputs (in its implementation and its fake impl, so torch.ops callers and
torch.compile get the same errors). The Python wrappers run the same checks before the dispatcher (which refuses
a non-tensor, or an int outside int64, with a message of its own) and add the segment id value check.

Sign convention: s_i = < dl_i/dtheta , dL_val/dtheta >. A gradient step on episode i moves theta by
-lr * dl_i/dtheta, which changes L_val by about -lr * s_i: positive s_i means training on episode i
lowers the validation loss (keep it); negative means it raises it.
"""

from __future__ import annotations

import math

import torch

from ippo.kernels import projection, torch_backend
from ippo.kernels.backends import select_backend

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
SCALING_LIMIT = torch.finfo(torch.float32).max  # the kernels take scaling as a float32
K_LIMIT = 2**31  # sketch width: the kernels index sketch columns with int32


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: low-precision inputs always accumulate in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_shapes(op: str, specs) -> dict[str, int]:
    """Check each (name, tensor, dims) against symbolic dims; returns the bound sizes, e.g. {"N": 12}."""
    sizes: dict[str, int] = {}
    first: dict[str, tuple[str, torch.Tensor]] = {}  # which tensor bound each dim, for the message
    for name, t, dims in specs:
        if t.dim() != len(dims):
            raise ValueError(f"{op}: {name} must be {len(dims)}-D with shape ({', '.join(dims)}); "
                             f"got shape {tuple(t.shape)}")
        for dim, size in zip(dims, t.shape):
            if dim not in sizes:
                sizes[dim], first[dim] = size, (name, t)
            elif sizes[dim] != size:
                other, other_t = first[dim]
                raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, i.e. {dim}={size}, but "
                                 f"{other} {tuple(other_t.shape)} has {dim}={sizes[dim]}")
    return sizes


def check_tensors(op: str, floats: dict, segment_ids=None, num_segments=None) -> None:
    """Types, dtypes, one device, and num_segments; segment id values are checked by ``check_segment_ids``."""
    for name, t in floats.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be float16, bfloat16, float32 or float64; got {t.dtype}")
    tensors = dict(floats)
    if segment_ids is not None:
        check_index_tensor(op, segment_ids)
        check_num_segments(op, num_segments)
        tensors["segment_ids"] = segment_ids
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: all tensors must be on one device; got "
                         + ", ".join(f"{n} on {d}" for n, d in devices.items()))


def check_index_tensor(op: str, segment_ids) -> None:
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dtype not in INDEX_DTYPES:
        raise ValueError(f"{op}: segment_ids must be an int32 or int64 tensor; got "
                         f"{getattr(segment_ids, 'dtype', type(segment_ids).__name__)}")


def check_num_segments(op: str, num_segments) -> None:
    if isinstance(num_segments, bool) or not isinstance(num_segments, (int, torch.SymInt)) or num_segments < 0:
        raise ValueError(f"{op}: num_segments must be a non-negative int; got {num_segments!r}")


def check_segment_ids(op: str, segment_ids, num_segments) -> None:
    """segment_ids an int tensor, num_segments an int >= 0, and every id -1 (ignored token) or an episode in
    [0, num_segments). The value check costs one device sync, so it is skipped while torch.compile traces;
    the ops themselves never read out of bounds (``segment_sum`` indexes with ``index_add_``, which checks)."""
    check_index_tensor(op, segment_ids)
    check_num_segments(op, num_segments)
    if segment_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(segment_ids.min()), int(segment_ids.max())
    if lo < -1 or hi >= num_segments:
        raise ValueError(f"{op}: segment_ids must lie in [-1, num_segments) = [-1, {num_segments}); "
                         f"got values in [{lo}, {hi}]")


def check_scaling(op: str, scaling) -> None:
    if (isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling)
            or abs(scaling) > SCALING_LIMIT):
        raise ValueError(f"{op}: scaling must be a finite number of float32 range (|scaling| <= {SCALING_LIMIT:.4g}); "
                         f"got {scaling!r}")


def check_lora_inputs(op: str, x, h, grad_y, grad_h, val_A=None, val_B=None, segment_ids=None, num_segments=None,
                      scaling=1.0) -> dict[str, int]:
    """The static checks of the ops' inputs (types, dtypes, one device, shapes; no device sync), run by each op
    and its fake impl; returns the sizes, e.g. {"N": 12, "r": 4}. val_A/val_B and segment_ids are optional."""
    floats = dict(x=x, h=h, grad_y=grad_y, grad_h=grad_h)
    specs = [("x", x, ("N", "d_in")), ("h", h, ("N", "r")), ("grad_y", grad_y, ("N", "d_out")),
             ("grad_h", grad_h, ("N", "r"))]
    if val_A is not None:
        floats.update(val_A=val_A, val_B=val_B)
        specs += [("val_A", val_A, ("r", "d_in")), ("val_B", val_B, ("d_out", "r"))]
    check_tensors(op, floats, segment_ids, num_segments)
    if segment_ids is not None:
        specs.append(("segment_ids", segment_ids, ("N",)))
    check_scaling(op, scaling)
    return check_shapes(op, specs)


def segment_sum(token_values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """(S,) per-segment sums of (N,) token values, in float64 then cast back; id -1 tokens are dropped,
    so a NaN on a padding token or in one episode never reaches another episode."""
    buf = torch.zeros(num_segments + 1, dtype=torch.float64, device=token_values.device)
    buf.index_add_(0, segment_ids.long() + 1, token_values.to(torch.float64))
    return buf[1:].to(token_values.dtype, copy=True)


def segment_order(segment_ids: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets) grouping tokens by episode, for the sketch kernels: ``order`` (N,) int64 token indices
    sorted by segment id (stable), ``offsets`` (num_segments + 1,) int64 with episode s's tokens at
    order[offsets[s]:offsets[s + 1]]. Ids outside [0, num_segments) (-1 = padding) fall outside every range and
    are ignored. O(N) memory, no device sync."""
    ids, order = torch.sort(segment_ids.long(), stable=True)
    bounds = torch.arange(num_segments + 1, dtype=torch.int64, device=segment_ids.device)
    return order, torch.searchsorted(ids, bounds)


# ---- token_influence and influence_scores -------------------------------------------------------------

def token_values(x, h, grad_y, grad_h, val_A, val_B, scaling: float) -> torch.Tensor:
    """(N,) per-token influence from the selected backend, in the accumulation dtype (inputs already checked)."""
    out = torch.zeros(x.shape[0], dtype=accumulation_dtype(x, h, grad_y, grad_h, val_A, val_B), device=x.device)
    if out.numel() and h.shape[1]:  # rank 0 or no token: every value is an empty sum, 0 (no kernel launched)
        _, backend = select_backend(x.device)
        backend.token_influence(x, h, grad_y, grad_h, val_A, val_B, scaling, out)
    return out


@torch.library.custom_op("ippo::token_influence", mutates_args=())
def _token_influence_op(x: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor, grad_h: torch.Tensor,
                        val_A: torch.Tensor, val_B: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """(N,) per-token influence of one LoRA layer, inputs as in ``influence_scores``, float32 (float64 for
    float64 inputs): grad_h[t] . (val_A x[t]) + scaling * grad_y[t] . (val_B h[t]). InfluenceScorer adds it
    up over the layers; ``influence_scores`` is its segment sum."""
    check_lora_inputs("token_influence", x, h, grad_y, grad_h, val_A, val_B, scaling=scaling)
    return token_values(x, h, grad_y, grad_h, val_A, val_B, scaling)


@_token_influence_op.register_fake
def _(x, h, grad_y, grad_h, val_A, val_B, scaling=1.0):
    check_lora_inputs("token_influence", x, h, grad_y, grad_h, val_A, val_B, scaling=scaling)
    return x.new_empty(x.shape[0], dtype=accumulation_dtype(x, h, grad_y, grad_h, val_A, val_B))


@torch.library.custom_op("ippo::influence_scores", mutates_args=())
def _influence_scores_op(x: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor, grad_h: torch.Tensor,
                         val_A: torch.Tensor, val_B: torch.Tensor, segment_ids: torch.Tensor,
                         num_segments: int, scaling: float = 1.0) -> torch.Tensor:
    check_lora_inputs("influence_scores", x, h, grad_y, grad_h, val_A, val_B, segment_ids, num_segments, scaling)
    return segment_sum(token_values(x, h, grad_y, grad_h, val_A, val_B, scaling), segment_ids, num_segments)


@_influence_scores_op.register_fake
def _(x, h, grad_y, grad_h, val_A, val_B, segment_ids, num_segments, scaling=1.0):
    check_lora_inputs("influence_scores", x, h, grad_y, grad_h, val_A, val_B, segment_ids, num_segments, scaling)
    return x.new_empty(num_segments, dtype=accumulation_dtype(x, h, grad_y, grad_h, val_A, val_B))


def influence_scores(x: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor, grad_h: torch.Tensor,
                     val_A: torch.Tensor, val_B: torch.Tensor, segment_ids: torch.Tensor, num_segments: int,
                     scaling: float = 1.0) -> torch.Tensor:
    """Per-episode influence of one LoRA layer, s_i = <dl_i/d(A,B), (val_A, val_B)>, without per-episode gradients.

    x: (N, d_in) LoRA input after dropout, h = x A^T: (N, r), grad_y: (N, d_out) = dl/dy,
    grad_h = scaling * grad_y B: (N, r), val_A: (r, d_in), val_B: (d_out, r), segment_ids: (N,) int
    episode of each token, -1 = ignore. Returns (num_segments,) float32 (float64 for float64 inputs):

        s_i = sum_{t: seg_t = i} grad_h[t] . (val_A x[t]) + scaling * grad_y[t] . (val_B h[t])

    Positive s_i: a gradient step on episode i lowers the validation loss. Bad input raises ValueError naming
    the argument (the op checks the same, but the dispatcher refuses a non-tensor before the op runs); this
    also checks the segment id values (``check_segment_ids``, one device sync).
    """
    check_lora_inputs("influence_scores", x, h, grad_y, grad_h, val_A, val_B, segment_ids, num_segments, scaling)
    check_segment_ids("influence_scores", segment_ids, num_segments)
    return torch.ops.ippo.influence_scores(x, h, grad_y, grad_h, val_A, val_B, segment_ids, num_segments, scaling)


# ---- lora_token_influence: the combine of the scorer's folded path -----------------------------------------

def check_combine_inputs(op: str, h, x_va, g_vb, grad_h, scaling) -> dict[str, int]:
    """The static checks of ``lora_token_influence`` (types, dtypes, one device, all four (N, r); no sync)."""
    floats = dict(h=h, x_va=x_va, g_vb=g_vb, grad_h=grad_h)
    check_tensors(op, floats)
    check_scaling(op, scaling)
    return check_shapes(op, [(name, t, ("N", "r")) for name, t in floats.items()])


def combine_values(h, x_va, g_vb, grad_h, scaling: float) -> torch.Tensor:
    """(N,) per-token influence from the selected backend's ``lora_token_influence`` (inputs already checked)."""
    out = torch.zeros(h.shape[0], dtype=accumulation_dtype(h, x_va, g_vb, grad_h), device=h.device)
    if out.numel() and h.shape[1]:  # rank 0 or no token: every value is an empty sum, 0 (no kernel launched)
        _, backend = select_backend(h.device)
        backend.lora_token_influence(h, x_va, g_vb, grad_h, scaling, out)
    return out


@torch.library.custom_op("ippo::lora_token_influence", mutates_args=())
def _lora_token_influence_op(h: torch.Tensor, x_va: torch.Tensor, g_vb: torch.Tensor, grad_h: torch.Tensor,
                             scaling: float = 1.0) -> torch.Tensor:
    """(N,) per-token influence of one LoRA layer from rank-r tensors only, float32 (float64 for float64 inputs):

        grad_h[t] . x_va[t] + scaling * h[t] . g_vb[t]

    with h = x A^T, x_va = x V_A^T, g_vb = grad_y V_B, grad_h = scaling * grad_y B, all (N, r). Equal to
    ``token_influence(x, h, grad_y, grad_h, V_A, V_B, scaling)``; InfluenceScorer gets x_va and g_vb from the
    LoRA GEMMs it already runs (x [A; V_A]^T, grad_y [B, V_B]), so this reads no (N, d) tensor."""
    check_combine_inputs("lora_token_influence", h, x_va, g_vb, grad_h, scaling)
    return combine_values(h, x_va, g_vb, grad_h, scaling)


@_lora_token_influence_op.register_fake
def _(h, x_va, g_vb, grad_h, scaling=1.0):
    check_combine_inputs("lora_token_influence", h, x_va, g_vb, grad_h, scaling)
    return h.new_empty(h.shape[0], dtype=accumulation_dtype(h, x_va, g_vb, grad_h))


# ---- gradient_sketches ----------------------------------------------------------------------------------

def check_sketch_params(op: str, k, r: int, seed, layer) -> None:
    if r < 1:
        raise ValueError(f"{op}: the LoRA rank r must be >= 1; got r = {r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k < K_LIMIT or k % (2 * r):
        raise ValueError(f"{op}: k must be a positive multiple of 2 * r = {2 * r} below 2**31; got {k!r}")
    for name, value, limit, text in (("seed", seed, projection.SEED_LIMIT, "2**63"),
                                     ("layer", layer, projection.LAYER_LIMIT, "2**29")):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
            raise ValueError(f"{op}: {name} must be an int in [0, {text}); got {value!r}")


def check_sketch_inputs(x, h, grad_y, grad_h, segment_ids, num_segments, k, seed, layer, scaling) -> None:
    """The static checks of ``gradient_sketches`` (no device sync), run by the op and its fake impl."""
    dims = check_lora_inputs("gradient_sketches", x, h, grad_y, grad_h, segment_ids=segment_ids,
                             num_segments=num_segments, scaling=scaling)
    check_sketch_params("gradient_sketches", k, dims["r"], seed, layer)


def sketch_values(x, h, grad_y, grad_h, segment_ids, num_segments: int, k: int, seed: int, layer: int,
                  scaling: float) -> torch.Tensor:
    """(num_segments, k) sketches from the selected backend's fused ``segment_sketch`` (inputs already checked).

    The A half, vec(G_A,i P_in^T), is the (S, r, m) block out[:, :r*m]; the B half, vec(P_out G_B,i), is laid out
    (S, m, r), so the kernel writes it through the transposed (S, r, m) view. No (tokens x r x m) tensor exists:
    beyond the output the backends keep O(tokens x m) (torch, cuda) or O(tokens) (triton) transient memory.
    """
    _, backend = select_backend(x.device)
    r = h.shape[1]
    m = k // (2 * r)
    dtype = accumulation_dtype(x, h, grad_y, grad_h)
    try:
        out = torch.empty((num_segments, k), dtype=dtype, device=x.device)
    except (RuntimeError, torch.OutOfMemoryError) as err:  # CPU: RuntimeError; CUDA: OutOfMemoryError
        raise ValueError(f"gradient_sketches: the (num_segments, k) = ({num_segments}, {k}) {dtype} output "
                         f"({num_segments * k * dtype.itemsize / 2**30:.3g} GiB) cannot be allocated on {x.device}; "
                         f"use a smaller k") from err
    order, offsets = segment_order(segment_ids, num_segments)
    backend.segment_sketch(x, grad_h, order, offsets, projection.projection_salt(seed, layer, projection.SIDE_IN),
                           1.0, out[:, :r * m].view(num_segments, r, m))
    backend.segment_sketch(grad_y, h, order, offsets, projection.projection_salt(seed, layer, projection.SIDE_OUT),
                           scaling, out[:, r * m:].view(num_segments, m, r).transpose(1, 2))
    return out


@torch.library.custom_op("ippo::gradient_sketches", mutates_args=())
def _gradient_sketches_op(x: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor, grad_h: torch.Tensor,
                          segment_ids: torch.Tensor, num_segments: int, k: int, seed: int = 0, layer: int = 0,
                          scaling: float = 1.0) -> torch.Tensor:
    check_sketch_inputs(x, h, grad_y, grad_h, segment_ids, num_segments, k, seed, layer, scaling)
    return sketch_values(x, h, grad_y, grad_h, segment_ids, num_segments, k, seed, layer, scaling)


@_gradient_sketches_op.register_fake
def _(x, h, grad_y, grad_h, segment_ids, num_segments, k, seed=0, layer=0, scaling=1.0):
    check_sketch_inputs(x, h, grad_y, grad_h, segment_ids, num_segments, k, seed, layer, scaling)
    return x.new_empty((num_segments, k), dtype=accumulation_dtype(x, h, grad_y, grad_h))


def gradient_sketches(x: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor, grad_h: torch.Tensor,
                      segment_ids: torch.Tensor, num_segments: int, k: int, seed: int = 0, layer: int = 0,
                      scaling: float = 1.0) -> torch.Tensor:
    """Per-episode JL sketch of one LoRA layer's gradient, (num_segments, k) float32 (float64 for float64 inputs).

    Inputs as in ``influence_scores``; k must be a multiple of 2r, m = k / (2r). With Rademacher
    P_in (m, d_in), P_out (m, d_out) generated in-kernel from (seed, layer) (never stored):

        sketch_i = [ vec(G_A,i P_in^T) , vec(P_out G_B,i) ],  G_A,i = sum_t grad_h[t] x[t]^T,
                                                             G_B,i = scaling * sum_t grad_y[t] h[t]^T

    so E[sketch_i . sketch_lora_gradient(V_A, V_B)] = s_i, with error ~ 1/sqrt(k). Bad input raises ValueError
    naming the argument, as in ``influence_scores``.

    The reduction is fused (``sketch_values``): sketch_A,i = sum_t grad_h[t] (x) (P_in x[t]) and sketch_B,i =
    scaling * sum_t (P_out grad_y[t]) (x) h[t] are summed per episode without any (tokens x r x m) tensor or
    per-episode gradient; segment ids may come in any order. Deterministic on every backend.
    """
    check_sketch_inputs(x, h, grad_y, grad_h, segment_ids, num_segments, k, seed, layer, scaling)
    check_segment_ids("gradient_sketches", segment_ids, num_segments)
    return torch.ops.ippo.gradient_sketches(x, h, grad_y, grad_h, segment_ids, num_segments, k, seed, layer, scaling)


def sketch_lora_gradient(grad_A: torch.Tensor, grad_B: torch.Tensor, k: int, seed: int = 0,
                         layer: int = 0) -> torch.Tensor:
    """(k,) sketch of a dense LoRA gradient (grad_A: (r, d_in), grad_B: (d_out, r)) with the projection of
    ``gradient_sketches(..., k, seed, layer)``: [vec(grad_A P_in^T), vec(P_out grad_B)].

    It is that op applied to r pseudo-tokens, x = grad_A, grad_y = grad_B^T, h = grad_h = I_r.
    """
    op = "sketch_lora_gradient"
    check_tensors(op, dict(grad_A=grad_A, grad_B=grad_B))
    r = check_shapes(op, [("grad_A", grad_A, ("r", "d_in")), ("grad_B", grad_B, ("d_out", "r"))])["r"]
    check_sketch_params(op, k, r, seed, layer)
    eye = torch.eye(r, dtype=grad_A.dtype, device=grad_A.device)
    seg = torch.zeros(r, dtype=torch.long, device=grad_A.device)
    return torch.ops.ippo.gradient_sketches(grad_A, eye, grad_B.T, eye, seg, 1, k, seed, layer, 1.0)[0]


# ---- segment_lora_gradients: per-episode LoRA weight gradients from the scored backward -------------------

def check_episode_grad_inputs(x, h, grad_y, grad_h, segment_ids, num_segments, scaling) -> dict[str, int]:
    """The static checks of ``segment_lora_gradients`` (no device sync), run by the op and its fake impl."""
    return check_lora_inputs("segment_lora_gradients", x, h, grad_y, grad_h, segment_ids=segment_ids,
                             num_segments=num_segments, scaling=scaling)


def _identity_rows(z: torch.Tensor, salt: int, m: int, acc: torch.dtype) -> torch.Tensor:
    """``segment_sketch``'s projection hook with P = I: the rows themselves, in the accumulation dtype."""
    return z.to(acc)


def episode_gradient_values(x, h, grad_y, grad_h, segment_ids, num_segments: int,
                            scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_A (S, r, d_in), grad_B (S, d_out, r)): the sketch's per-episode reduction with P = I (the torch
    backend's ``segment_sketch``, one (r x n_s) @ (n_s x d) GEMM per episode over its tokens: the FLOPs of the dense
    weight gradient). Every device runs this torch reduction; no Triton or CUDA kernel of it is written yet."""
    dtype = accumulation_dtype(x, h, grad_y, grad_h)
    r, d_in, d_out = h.shape[1], x.shape[1], grad_y.shape[1]
    try:
        grad_A = torch.zeros((num_segments, r, d_in), dtype=dtype, device=x.device)
        grad_B = torch.zeros((num_segments, d_out, r), dtype=dtype, device=x.device)
    except (RuntimeError, torch.OutOfMemoryError) as err:  # CPU: RuntimeError; CUDA: OutOfMemoryError
        raise ValueError(f"segment_lora_gradients: the per-episode gradients of num_segments={num_segments} episodes "
                         f"({num_segments * r * (d_in + d_out) * dtype.itemsize / 2**30:.3g} GiB) cannot be allocated "
                         f"on {x.device}") from err
    if r and x.shape[0] and num_segments:
        order, offsets = segment_order(segment_ids, num_segments)
        torch_backend.segment_sketch(x, grad_h, order, offsets, 0, 1.0, grad_A, project=_identity_rows)
        torch_backend.segment_sketch(grad_y, h, order, offsets, 0, scaling, grad_B.transpose(1, 2),
                                     project=_identity_rows)
    return grad_A, grad_B


@torch.library.custom_op("ippo::segment_lora_gradients", mutates_args=())
def _segment_lora_gradients_op(x: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor, grad_h: torch.Tensor,
                               segment_ids: torch.Tensor, num_segments: int,
                               scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    check_episode_grad_inputs(x, h, grad_y, grad_h, segment_ids, num_segments, scaling)
    return episode_gradient_values(x, h, grad_y, grad_h, segment_ids, num_segments, scaling)


@_segment_lora_gradients_op.register_fake
def _(x, h, grad_y, grad_h, segment_ids, num_segments, scaling=1.0):
    dims = check_episode_grad_inputs(x, h, grad_y, grad_h, segment_ids, num_segments, scaling)
    dtype = accumulation_dtype(x, h, grad_y, grad_h)
    return (x.new_empty((num_segments, dims["r"], dims["d_in"]), dtype=dtype),
            x.new_empty((num_segments, dims["d_out"], dims["r"]), dtype=dtype))


def segment_lora_gradients(x: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor, grad_h: torch.Tensor,
                           segment_ids: torch.Tensor, num_segments: int,
                           scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-episode gradients of one LoRA layer, (grad_A (S, r, d_in), grad_B (S, d_out, r)), S = num_segments,
    float32 (float64 for float64 inputs). Inputs as in ``influence_scores``:

        grad_A[i] = sum_{t: seg_t = i} grad_h[t] x[t]^T,   grad_B[i] = scaling * sum_{t: seg_t = i} grad_y[t] h[t]^T

    so grad_A.sum(0), grad_B.sum(0) are the layer's usual LoRA weight gradients (over tokens with seg_t >= 0), and
    <grad_A[i], val_A> + <grad_B[i], val_B> = influence_scores(...)[i]. Memory: S x the layer's LoRA parameters.
    Bad input raises ValueError naming the argument, as in ``influence_scores``.
    """
    check_episode_grad_inputs(x, h, grad_y, grad_h, segment_ids, num_segments, scaling)
    check_segment_ids("segment_lora_gradients", segment_ids, num_segments)
    return torch.ops.ippo.segment_lora_gradients(x, h, grad_y, grad_h, segment_ids, num_segments, scaling)
