"""torch.library registration (opcheck, torch.compile), backend selection, and clear errors for bad input."""

import pytest
import torch
from conftest import DEVICE
from helpers import folded_inputs, random_inputs

from ippo.kernels import gradient_sketches, influence_scores, sketch_lora_gradient
from ippo.kernels.backends import select_backend


def op_inputs(dtype=torch.float32, n=33, d_in=20, d_out=12, r=3, episodes=4):
    args, segment_ids = random_inputs(n, d_in, d_out, r, episodes, dtype, torch.Generator().manual_seed(1))
    return args, segment_ids, episodes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck(backend, dtype):
    args, segment_ids, episodes = op_inputs(dtype)
    torch.library.opcheck(torch.ops.ippo.token_influence.default, (*args.values(), 0.5))
    torch.library.opcheck(torch.ops.ippo.influence_scores.default,
                          (*args.values(), segment_ids, episodes, 0.5))
    sketch_args = [args[k] for k in ("x", "h", "grad_y", "grad_h")]
    torch.library.opcheck(torch.ops.ippo.gradient_sketches.default,
                          (*sketch_args, segment_ids, episodes, 12, 7, 2, 0.5))


def combine_inputs(dtype=torch.float32, n=33):
    """lora_token_influence's (h, x_va, g_vb, grad_h), (n, 3), strided like the scorer's."""
    return tuple(folded_inputs(n, 20, 12, 3, 4, dtype, torch.Generator().manual_seed(1))[1].values())


@pytest.mark.parametrize("n", [33, 1, 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck_lora_token_influence(backend, dtype, n):
    """The scorer's combine under opcheck (schema, fake impl, autograd registration), and traced whole by
    torch.compile."""
    args = combine_inputs(dtype, n)
    torch.library.opcheck(torch.ops.ippo.lora_token_influence.default, (*args, 0.5))
    torch._dynamo.reset()  # a fresh cache per case: the 3 x 3 x backends cases exceed the recompile limit
    compiled = torch.compile(torch.ops.ippo.lora_token_influence, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args, 0.5), torch.ops.ippo.lora_token_influence(*args, 0.5))


def test_influence_scores_is_the_segment_sum_of_token_influence(backend):
    args, segment_ids, episodes = op_inputs(torch.float64)
    tokens = torch.ops.ippo.token_influence(*args.values(), 0.5)
    assert tokens.shape == (segment_ids.shape[0],) and tokens.dtype == torch.float64
    per_episode = torch.zeros(episodes, dtype=torch.float64, device=DEVICE).index_add_(
        0, segment_ids.clamp_min(0), tokens * (segment_ids >= 0))
    torch.testing.assert_close(influence_scores(**args, segment_ids=segment_ids, num_segments=episodes, scaling=0.5),
                               per_episode, rtol=1e-12, atol=1e-12)


def test_op_schemas_default_like_the_wrappers():
    """scaling = 1.0 (and seed = layer = 0 for the sketches) when left out of a torch.ops call."""
    args, segment_ids, episodes = op_inputs(torch.float64)
    ops = torch.ops.ippo
    assert torch.equal(ops.influence_scores(*args.values(), segment_ids, episodes),
                       ops.influence_scores(*args.values(), segment_ids, episodes, 1.0))
    assert torch.equal(ops.token_influence(*args.values()), ops.token_influence(*args.values(), 1.0))
    combine = combine_inputs(torch.float64)
    assert torch.equal(ops.lora_token_influence(*combine), ops.lora_token_influence(*combine, 1.0))
    sketch_args = [args[k] for k in ("x", "h", "grad_y", "grad_h")]
    assert torch.equal(ops.gradient_sketches(*sketch_args, segment_ids, episodes, 12),
                       ops.gradient_sketches(*sketch_args, segment_ids, episodes, 12, 0, 0, 1.0))


@pytest.mark.parametrize("device", [DEVICE, "meta"])
def test_ops_check_their_own_inputs(device):
    """torch.ops callers get the wrappers' errors, not an out-of-bounds read; on meta tensors the fake impls
    (what torch.compile traces) raise the same."""
    args, segment_ids, episodes = op_inputs()
    args, segment_ids = {k: v.to(device) for k, v in args.items()}, segment_ids.to(device)
    short_h = dict(args, h=args["h"][:5])
    message = r"h has shape \(5, 3\), i\.e\. N=5, but x \(33, 20\) has N=33"
    with pytest.raises(ValueError, match="influence_scores: " + message):
        torch.ops.ippo.influence_scores(*short_h.values(), segment_ids, episodes)
    with pytest.raises(ValueError, match="token_influence: " + message):
        torch.ops.ippo.token_influence(*short_h.values())
    sketch_args = [short_h[k] for k in ("x", "h", "grad_y", "grad_h")]
    with pytest.raises(ValueError, match="gradient_sketches: " + message):
        torch.ops.ippo.gradient_sketches(*sketch_args, segment_ids, episodes, 12)
    with pytest.raises(ValueError, match=r"gradient_sketches: k must be a positive multiple of 2 \* r = 6 .*; got 8"):
        torch.ops.ippo.gradient_sketches(*(args[k] for k in ("x", "h", "grad_y", "grad_h")), segment_ids, episodes, 8)
    with pytest.raises(ValueError, match="influence_scores: segment_ids must be an int32 or int64 tensor"):
        torch.ops.ippo.influence_scores(*args.values(), segment_ids.float(), episodes)
    other = "cpu" if device == "meta" else "meta"
    elsewhere = dict(args, val_B=torch.zeros(args["val_B"].shape, device=other))
    with pytest.raises(ValueError, match=rf"token_influence: all tensors must be on one device; .*val_B on {other}"):
        torch.ops.ippo.token_influence(*elsewhere.values())
    h, x_va, g_vb, grad_h = (t.to(device) for t in combine_inputs())
    with pytest.raises(ValueError, match=r"lora_token_influence: x_va has shape \(5, 3\), i\.e\. N=5, but h \(33, 3\)"):
        torch.ops.ippo.lora_token_influence(h, x_va[:5], g_vb, grad_h)
    with pytest.raises(ValueError, match=r"lora_token_influence: g_vb has shape \(33, 2\), i\.e\. r=2, but h "):
        torch.ops.ippo.lora_token_influence(h, x_va, g_vb[:, :2], grad_h)
    with pytest.raises(ValueError, match=r"lora_token_influence: grad_h must be float16, bfloat16, float32 or float64"):
        torch.ops.ippo.lora_token_influence(h, x_va, g_vb, grad_h.long())
    with pytest.raises(ValueError, match=r"lora_token_influence: scaling must be a finite number .*; got inf"):
        torch.ops.ippo.lora_token_influence(h, x_va, g_vb, grad_h, float("inf"))
    with pytest.raises(ValueError, match=rf"lora_token_influence: all tensors must be on one device; .*h on {other}"):
        torch.ops.ippo.lora_token_influence(h, x_va, g_vb, torch.zeros(grad_h.shape, device=other))


def test_rank_0_gives_zeros_on_every_backend(backend):
    """r = 0: every per-token value is an empty sum; each backend gives the same zeros (no kernel launch)."""
    n = 5
    empty = torch.zeros(n, 0, device=DEVICE)
    zeros = torch.zeros(n, device=DEVICE)
    torch.testing.assert_close(torch.ops.ippo.lora_token_influence(empty, empty, empty, empty), zeros)
    x, grad_y = torch.randn(n, 4, device=DEVICE), torch.randn(n, 3, device=DEVICE)
    tokens = torch.ops.ippo.token_influence(x, empty, grad_y, empty, torch.zeros(0, 4, device=DEVICE),
                                            torch.zeros(3, 0, device=DEVICE))
    torch.testing.assert_close(tokens, zeros)


def test_op_never_reads_out_of_bounds_segments():
    """An id past num_segments, which only the wrapper's value check names, still raises in a direct op call."""
    args, segment_ids, episodes = op_inputs()
    args = {k: v.cpu() for k, v in args.items()}
    with pytest.raises(IndexError):
        torch.ops.ippo.influence_scores(*args.values(), torch.full_like(segment_ids.cpu(), episodes), episodes)


def test_non_tensor_argument_names_it():
    """The wrappers raise ValueError like for any bad input; a direct op call gets the dispatcher's error."""
    args, segment_ids, episodes = op_inputs()
    with pytest.raises(ValueError, match="influence_scores: val_A must be a torch.Tensor; got list"):
        influence_scores(**dict(args, val_A=[[1.0]]), segment_ids=segment_ids, num_segments=episodes)
    with pytest.raises(ValueError, match="gradient_sketches: grad_y must be a torch.Tensor; got list"):
        gradient_sketches(args["x"], args["h"], [[1.0]], args["grad_h"], segment_ids, episodes, k=6)
    with pytest.raises(RuntimeError, match="Expected a value of type 'Tensor' for argument 'val_A'"):
        torch.ops.ippo.influence_scores(*dict(args, val_A=[[1.0]]).values(), segment_ids, episodes)


def test_torch_compile_fullgraph(backend):
    args, segment_ids, episodes = op_inputs()
    compiled = torch.compile(influence_scores, backend="aot_eager", fullgraph=True)
    expected = influence_scores(**args, segment_ids=segment_ids, num_segments=episodes)
    torch.testing.assert_close(compiled(**args, segment_ids=segment_ids, num_segments=episodes), expected)


def test_backend_env_var(monkeypatch):
    monkeypatch.setenv("IPPO_BACKEND", "fastest")
    with pytest.raises(ValueError, match="IPPO_BACKEND must be one of auto, torch, triton, cuda; got 'fastest'"):
        select_backend(torch.device("cpu"))
    monkeypatch.setenv("IPPO_BACKEND", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="IPPO_BACKEND=cuda cannot run on cpu tensors"):
            select_backend(torch.device("cpu"))
    monkeypatch.delenv("IPPO_BACKEND")
    assert select_backend(torch.device("cpu"))[0] == "torch"


def test_named_triton_without_interpreter_raises_on_cpu(monkeypatch):
    monkeypatch.setenv("IPPO_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1"):
        select_backend(torch.device("cpu"))


def bad_inputs():
    """(description, kwargs overrides, expected message fragment) for influence_scores."""
    args, segment_ids, episodes = op_inputs()
    n = segment_ids.shape[0]
    return [
        ("h rank differs", dict(h=args["h"][:, :2]),
         r"grad_h has shape \(33, 3\), i\.e\. r=3, but h \(33, 2\) has r=2"),
        ("x 1-D", dict(x=args["x"][:, 0]), r"x must be 2-D with shape \(N, d_in\); got shape \(33,\)"),
        ("val_A d_in", dict(val_A=args["val_A"][:, :5]),
         r"val_A has shape \(3, 5\), i\.e\. d_in=5, but x \(33, 20\) has d_in=20"),
        ("val_B d_out", dict(val_B=args["val_B"][:7]), r"val_B has shape \(7, 3\), i\.e\. d_out=7"),
        ("short ids", dict(segment_ids=segment_ids[:-1]), r"segment_ids has shape \(32,\), i\.e\. N=32"),
        ("int x", dict(x=args["x"].long()), r"x must be float16, bfloat16, float32 or float64; got torch.int64"),
        ("float ids", dict(segment_ids=segment_ids.float()),
         r"segment_ids must be an int32 or int64 tensor; got torch.float32"),
        ("id too big", dict(segment_ids=torch.full((n,), episodes, device=DEVICE)),
         r"segment_ids must lie in \[-1, num_segments\) = \[-1, 4\); got values in \[4, 4\]"),
        ("id -2", dict(segment_ids=torch.full((n,), -2, device=DEVICE)), r"got values in \[-2, -2\]"),
        ("negative count", dict(num_segments=-1), r"num_segments must be a non-negative int; got -1"),
        ("nan scaling", dict(scaling=float("nan")), r"scaling must be a finite number of float32 range .*; got nan"),
        ("huge scaling", dict(scaling=1e308), r"scaling must be a finite number of float32 range .*; got 1e\+308"),
        ("device", dict(val_B=args["val_B"].to("meta")), r"all tensors must be on one device; got .*val_B on meta"),
    ]


@pytest.mark.parametrize("case", bad_inputs(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, overrides, message = case
    args, segment_ids, episodes = op_inputs()
    kwargs = dict(args, segment_ids=segment_ids, num_segments=episodes, scaling=1.0)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        influence_scores(**kwargs)


def test_sketch_bad_input():
    args, segment_ids, episodes = op_inputs(r=3)
    sketch_args = {k: args[k] for k in ("x", "h", "grad_y", "grad_h")}
    with pytest.raises(ValueError, match=r"k must be a positive multiple of 2 \* r = 6 below 2\*\*31; got 10"):
        gradient_sketches(**sketch_args, segment_ids=segment_ids, num_segments=episodes, k=10)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\); got -1"):
        gradient_sketches(**sketch_args, segment_ids=segment_ids, num_segments=episodes, k=12, seed=-1)
    with pytest.raises(ValueError, match=r"k must be a positive multiple of .* below 2\*\*31; got 1099511627776"):
        gradient_sketches(**sketch_args, segment_ids=segment_ids, num_segments=episodes, k=2**40)
    with pytest.raises(ValueError, match=r"\(num_segments, k\) = \(4096, 1073741826\) torch.float32 output .* cannot "
                       r"be allocated .*; use a smaller k"):  # 16 TiB
        gradient_sketches(**sketch_args, segment_ids=segment_ids.cpu(), num_segments=4096, k=2**30 + 2)
    with pytest.raises(ValueError, match=r"grad_B has shape \(12, 2\), i\.e\. r=2, but grad_A \(3, 20\) has r=3"):
        sketch_lora_gradient(args["val_A"], args["val_B"][:, :2], k=12)


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    import ippo.kernels.backends as backends

    monkeypatch.delenv("IPPO_BACKEND", raising=False)
    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda name, device: "triton missing" if name == "triton" else None)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match=r"triton backend unavailable \(triton missing\); using the slower torch"):
        assert select_backend(torch.device("cuda"))[0] == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_backend(torch.device("cuda"))[0] == "torch"  # no second warning


def test_info_lists_every_backend():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "ippo.info"], capture_output=True, text=True, check=True).stdout
    for name in ("torch backend:", "triton backend:", "cuda backend:"):
        assert name in out
    assert "IPPO_BACKEND=" in out


def test_demo_one_backward_matches_loop(capsys):
    from ippo.demo import main

    main(["--episodes", "3", "--max-tokens", "8", "--hidden", "32", "--layers", "1", "--rank", "2"])
    out = capsys.readouterr().out
    relative = float(out.split("max |difference| / max |score| = ")[1].split(";")[0])
    assert relative < 1e-4 and out.count("keep") + out.count("drop") == 3


def test_sketch_layer_out_of_range():
    args, segment_ids, episodes = op_inputs(r=3)
    sketch_args = {k: args[k] for k in ("x", "h", "grad_y", "grad_h")}
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\*\*29\); got 536870912"):
        gradient_sketches(**sketch_args, segment_ids=segment_ids, num_segments=episodes, k=12, layer=2**29)


@pytest.mark.parametrize("layout", ["unsorted", "empty episodes and padding", "no tokens"])
def test_opcheck_gradient_sketches_layouts(backend, layout):
    """The fused sketch op under opcheck (schema, fake impl, autograd registration) on the segment layouts the
    kernels treat differently; and traced whole by torch.compile."""
    args, segment_ids, episodes = op_inputs(torch.float64, n=0 if layout == "no tokens" else 33)
    if layout == "empty episodes and padding":
        segment_ids = torch.where(segment_ids % 2 == 1, -1, segment_ids)
    sketch_args = [args[k] for k in ("x", "h", "grad_y", "grad_h")]
    torch.library.opcheck(torch.ops.ippo.gradient_sketches.default,
                          (*sketch_args, segment_ids, episodes, 36, 3, 1, 0.5))
    compiled = torch.compile(gradient_sketches, backend="aot_eager", fullgraph=True)
    expected = gradient_sketches(*sketch_args, segment_ids, episodes, k=36, seed=3, layer=1, scaling=0.5)
    torch.testing.assert_close(compiled(*sketch_args, segment_ids, episodes, k=36, seed=3, layer=1, scaling=0.5),
                               expected)
