"""The cuda backend (ippo._C from csrc/): build metadata and error paths everywhere, parity on a CUDA device.

Parity bar: against the float64 reference, our max error is at most 2x that of the same computation done
by eager torch in the input precision, plus a tiny floor (a few fp32 ulps of the sum of |terms|).
"""

import math
import os
import re
import zlib

import pytest
import torch

from ippo.kernels import cuda_backend, gradient_sketches, influence_scores
from ippo.kernels.projection import projection_salt, rademacher_signs

try:
    from ippo import _C
except ImportError:
    _C = None

PROBLEM = cuda_backend.build_problem()
HAS_DEVICE = PROBLEM is None and torch.cuda.is_available()
needs_ext = pytest.mark.skipif(_C is None, reason=f"ippo._C unavailable: {PROBLEM}")
needs_device = pytest.mark.skipif(not HAS_DEVICE,
                                  reason=f"needs a CUDA device and ippo._C: {PROBLEM or 'no CUDA device'}")
no_device = pytest.mark.skipif(_C is None or HAS_DEVICE or torch.cuda.is_available(),
                               reason="checks the no-device path (needs ippo._C and no CUDA device)")
FP32_ULP = 2.0 ** -24


# ---- everywhere ---------------------------------------------------------------------------------------

@needs_ext
def test_extension_reports_archs_and_cuda_version():
    assert re.fullmatch(r"\d+\.\d+", _C.cuda_version)
    assert _C.archs and all(re.fullmatch(r"(sm|compute)_\d+[af]?", a) for a in _C.archs), _C.archs
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        assert {"sm_80", "sm_90", "compute_90"} <= set(_C.archs)
    assert any(a.startswith("compute_") for a in _C.archs) or os.environ.get("TORCH_CUDA_ARCH_LIST")
    assert {getattr(torch, k): v for k, v in _C.DTYPE_CODES.items()} == cuda_backend.DTYPE_CODES


@no_device
def test_built_no_device_is_reported():
    assert PROBLEM.startswith("built, no device"), PROBLEM
    text = cuda_backend.describe()
    assert text.startswith("built, no device"), text
    assert _C.cuda_version in text and "sm_" in text
    count, why = _C.device_status()
    assert count == 0 and why


@no_device
def test_launch_without_device_raises_cuda_error():
    with pytest.raises(RuntimeError, match=r"ippo\._C\.project_rows: CUDA error cuda\w+: "):
        _C.project_rows((0, 2, 1, 1), 0, 2, 1, 1, 1, 1, 1, 0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="CUDA error"):
        x = (0, 2, 1, 1)
        _C.token_influence(x, x, x, x, x, x, 0, 2, 1, 1, 1, 1, 1, 1.0, 0, 0)


@needs_ext
def test_extension_argument_checks():
    x = (0, 2, 1, 1)
    with pytest.raises(ValueError, match="dtype code"):
        _C.token_influence((0, 9, 1, 1), x, x, x, x, x, 0, 2, 1, 1, 1, 1, 1, 1.0, 0, 0)
    with pytest.raises(ValueError, match="r >= 1"):
        _C.token_influence(x, x, x, x, x, x, 0, 2, 1, 1, 1, 1, 0, 1.0, 0, 0)
    with pytest.raises(ValueError, match="fp32/fp64"):
        _C.project_rows(x, 0, 0, 1, 1, 1, 1, 1, 0, 1.0, 0, 0)
    _C.token_influence(x, x, x, x, x, x, 0, 2, 1, 0, 4, 4, 2, 1.0, 0, 0)  # n = 0: no launch, no device needed


def test_cuda_backend_on_cpu_tensors_raises(monkeypatch):
    monkeypatch.setenv("IPPO_BACKEND", "cuda")
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out, r = 5, 8, 6, 2
    x, h, gy, gh = (torch.randn(n, k, generator=g) for k in (d_in, r, d_out, r))
    va, vb = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    seg = torch.zeros(n, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"IPPO_BACKEND=cuda cannot run on cpu tensors: .*(not built|built|CUDA)"):
        influence_scores(x, h, gy, gh, va, vb, seg, 1)
    with pytest.raises(RuntimeError, match="IPPO_BACKEND=cuda cannot run on cpu tensors"):
        gradient_sketches(x, h, gy, gh, seg, 1, k=4 * r)
    if _C is not None:
        with pytest.raises(RuntimeError, match="cuda backend"):
            cuda_backend.token_influence(x, h, gy, gh, va, vb, 1.0, torch.zeros(n))


# ---- on a CUDA device -------------------------------------------------------------------------------

# (N, d_in, d_out, r): degenerate, r = 1, 3, 16, ranks past one 16/32/64 chunk, dims off every block size.
SHAPES = [(0, 64, 32, 16), (1, 17, 33, 1), (37, 100, 250, 3), (300, 576, 1000, 16), (129, 200, 130, 40),
          (70, 64, 72, 100), (513, 1536, 257, 16), (33, 8, 9, 64)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _inputs(n, d_in, d_out, r, dtype, layout, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)
    if layout == "contiguous":
        x, gy, va, vb = randn(n, d_in), randn(n, d_out), randn(r, d_in), randn(d_out, r)
    else:  # transposed / every-other-column / offset views
        x, gy = randn(d_in, n).T, randn(n, 2 * d_out + 1)[:, 1::2]
        va, vb = randn(d_in, r).T, randn(r, d_out).T
    return dict(x=x, h=randn(n, r), grad_y=gy, grad_h=randn(n, r), val_A=va, val_B=vb)


def _tokens(t, scaling, dtype):
    """Per-token scores with every operation in ``dtype`` (float64: the reference; input dtype: eager torch)."""
    x, h, gy, gh, va, vb = (t[k].to(dtype) for k in ("x", "h", "grad_y", "grad_h", "val_A", "val_B"))
    return (gh * (x @ va.T)).sum(-1) + scaling * (h * (gy @ vb)).sum(-1)


def _magnitude(t, scaling):
    a = {k: v.double().abs() for k, v in t.items()}
    term_a = (a["grad_h"] * (a["x"] @ a["val_A"].T)).sum(-1)
    return term_a + abs(scaling) * (a["h"] * (a["grad_y"] @ a["val_B"])).sum(-1)


def _assert_within(ours, ref, eager, magnitude, what):
    err = (ours.double() - ref).abs().max().item() if ref.numel() else 0.0
    bar = (eager.double() - ref).abs().max().item() if ref.numel() else 0.0
    floor = 16 * FP32_ULP * (magnitude.max().item() if magnitude.numel() else 0.0) + 1e-30
    assert err <= 2 * bar + floor, f"{what}: max error {err:.3g} > 2 x eager {bar:.3g} + floor {floor:.3g}"


@needs_device
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_token_influence_vs_float64(shape, dtype, layout):
    n, d_in, d_out, r = shape
    t = _inputs(n, d_in, d_out, r, dtype, layout, seed=zlib.crc32(f"{shape}{dtype}{layout}".encode()))
    scaling = 0.75
    out0 = torch.randn(n, device="cuda")  # accumulates into out
    out = out0.clone()
    cuda_backend.token_influence(*t.values(), scaling, out)
    torch.cuda.synchronize()
    ref = out0.double() + _tokens(t, scaling, torch.float64)
    eager = out0.double() + _tokens(t, scaling, dtype).double()
    _assert_within(out, ref, eager, _magnitude(t, scaling) + out0.double().abs(), f"{shape} {dtype} {layout}")


@needs_device
@pytest.mark.parametrize("shape", [(1, 3, 5, 1), (100, 300, 70, 20)], ids=str)
def test_token_influence_float64_and_mixed(shape):
    n, d_in, d_out, r = shape
    t = _inputs(n, d_in, d_out, r, torch.float64, "strided", seed=1)
    out = torch.zeros(n, dtype=torch.float64, device="cuda")
    cuda_backend.token_influence(*t.values(), 2.0, out)
    ref = _tokens(t, 2.0, torch.float64)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12 * _magnitude(t, 2.0).max().item())
    mixed = {k: v.to(dt) for (k, v), dt in zip(t.items(), [torch.bfloat16, torch.float32, torch.float16,
                                                            torch.float32, torch.bfloat16, torch.float16])}
    out32 = torch.zeros(n, device="cuda")
    cuda_backend.token_influence(*mixed.values(), 2.0, out32)
    ref = _tokens(mixed, 2.0, torch.float64)
    _assert_within(out32, ref, _tokens(mixed, 2.0, torch.float32), _magnitude(mixed, 2.0), f"mixed {shape}")


@needs_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (37, 70, 90, 3, 5), (300, 576, 1000, 16, 9), (129, 65, 200, 5, 40)],
                         ids=str)
def test_influence_scores_cuda_vs_triton_vs_float64(shape, dtype, monkeypatch):
    """The op end to end on ragged episodes (ids in [-1, episodes)): cuda and triton both meet the bar."""
    n, d_in, d_out, r, episodes = shape
    t = _inputs(n, d_in, d_out, r, dtype, "strided", seed=7)
    seg = torch.randint(-1, episodes, (n,), device="cuda")
    scaling = 1.5

    def per_episode(v):
        buf = torch.zeros(episodes + 1, dtype=torch.float64, device="cuda")
        return buf.index_add_(0, seg + 1, v.double())[1:]
    ref = per_episode(_tokens(t, scaling, torch.float64))
    eager = per_episode(_tokens(t, scaling, dtype).double())
    mag = per_episode(_magnitude(t, scaling))
    results = {}
    for name in ("cuda", "triton"):
        monkeypatch.setenv("IPPO_BACKEND", name)
        results[name] = influence_scores(*t.values(), seg, episodes, scaling)
        _assert_within(results[name], ref, eager, mag, f"{name} {shape} {dtype}")
    # Both within 2 x eager of the reference, so within 4 x eager (+ 2 floors) of each other.
    diff = (results["cuda"].double() - results["triton"].double()).abs().max().item() if episodes else 0.0
    bar = (eager - ref).abs().max().item()
    assert diff <= 4 * bar + 32 * FP32_ULP * mag.max().item() + 1e-30, f"cuda vs triton: {diff:.3g} vs eager {bar:.3g}"


@needs_device
def test_token_influence_on_side_stream():
    t = _inputs(257, 300, 500, 16, torch.bfloat16, "contiguous", seed=3)
    out = torch.zeros(257, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda_backend.token_influence(*t.values(), 1.0, out)
    stream.synchronize()
    ref = _tokens(t, 1.0, torch.float64)
    _assert_within(out, ref, _tokens(t, 1.0, torch.bfloat16), _magnitude(t, 1.0), "side stream")


@needs_device
@pytest.mark.parametrize("salt", [0, 0xFFFFFFFF, projection_salt(2**40 + 7, 3, 1)])
def test_project_rows_signs_bit_exact(salt):
    """Projecting the identity returns the generated matrix itself: the in-kernel hash is projection.py's."""
    d, m = 300, 100
    out = cuda_backend.project_rows(torch.eye(d, device="cuda"), salt, m, torch.float32)
    expected = rademacher_signs(salt, m, d, device="cuda").T * torch.tensor(1 / math.sqrt(m), dtype=torch.float32)
    assert torch.equal(out, expected)


@needs_device
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(0, 10, 5), (1, 1, 1), (65, 130, 70), (300, 1000, 64), (17, 2000, 129)], ids=str)
def test_project_rows_vs_float64(shape, dtype):
    n, d, m = shape
    g = torch.Generator().manual_seed(n + d + m)
    x = torch.randn(d, 2 * n + 1, generator=g).to("cuda", dtype).T[1::2]  # strided rows and columns
    salt = projection_salt(11, 5, 0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = cuda_backend.project_rows(x, salt, m, acc)
    assert out.shape == (n, m) and out.dtype == acc
    signs = rademacher_signs(salt, m, d, device="cuda")
    ref = (x.double() @ signs.double().T) / math.sqrt(m)
    eager = (x @ signs.to(dtype).T) / math.sqrt(m)
    mag = (x.double().abs().sum(-1, keepdim=True) / math.sqrt(m)).expand(n, m)
    if dtype == torch.float64:
        assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12 * (mag.max().item() if n else 1.0))
    else:
        _assert_within(out, ref, eager, mag, f"project_rows {shape} {dtype}")


@needs_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_sketches_cuda_vs_torch(dtype, monkeypatch):
    n, d_in, d_out, r, episodes, k = 200, 130, 300, 4, 6, 96
    t = _inputs(n, d_in, d_out, r, dtype, "strided", seed=5)
    seg = torch.randint(-1, episodes, (n,), device="cuda")
    args = (t["x"], t["h"], t["grad_y"], t["grad_h"], seg, episodes, k)
    monkeypatch.setenv("IPPO_BACKEND", "cuda")
    ours = gradient_sketches(*args, seed=3, layer=2, scaling=0.5)
    monkeypatch.setenv("IPPO_BACKEND", "torch")
    ref = gradient_sketches(*(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                              for a in args), seed=3, layer=2, scaling=0.5)
    scale = ref.abs().max().item()
    assert (ours.double() - ref).abs().max().item() <= 1e-5 * scale + 1e-6


def test_kernel_hash_is_projection_py_bit_for_bit():
    """The CUDA kernels' sign hash (run on the host) against projection.py, for a few salts and odd sizes."""
    _C = pytest.importorskip("ippo._C", reason="ippo._C not built (no nvcc at install time)")
    from ippo.kernels.projection import SIDE_OUT, projection_salt, rademacher_signs

    for salt in (0, 1, projection_salt(7, 3, SIDE_OUT), 2**32 - 1):
        signs = torch.frombuffer(bytearray(_C.projection_signs(salt, 37, 101)), dtype=torch.int8).view(37, 101)
        assert torch.equal(signs.float(), rademacher_signs(salt, 37, 101))
