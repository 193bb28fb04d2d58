"""The standalone influence kernel's achieved bandwidth, as a fraction of the device-to-device copy bandwidth
measured in the same run (bytes read + written). CUDA only: on CPU there is nothing meaningful to measure."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, RESULTS, save_results

from ippo.kernels.backends import select_backend, unavailable_reason

TOKENS = 16 * 512
SHAPES = [(576, 576, 16), (576, 1536, 16), (1536, 1536, 16), (1536, 8960, 16)]  # (d_in, d_out, r)

pytestmark = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")


def cuda_time(fn, repeats: int = 20) -> float:
    """Median seconds of fn() over CUDA events, after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def test_copy_bandwidth(benchmark):
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    seconds = benchmark.pedantic(lambda: cuda_time(lambda: dst.copy_(src)), rounds=1, iterations=1)
    RESULTS.setdefault("kernel bandwidth", {})["copy_GBps"] = 2 * src.numel() / seconds / 1e9
    save_results()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_influence_kernel_bandwidth(benchmark, monkeypatch, backend, shape):
    reason = unavailable_reason(backend, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv("IPPO_BACKEND", backend)
    d_in, d_out, r = shape
    x, grad_y = (torch.randn(TOKENS, d, device=DEVICE, dtype=torch.bfloat16) for d in (d_in, d_out))
    h, grad_h = (torch.randn(TOKENS, r, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    val_A = torch.randn(r, d_in, device=DEVICE, dtype=torch.bfloat16)
    val_B = torch.randn(d_out, r, device=DEVICE, dtype=torch.bfloat16)
    out = torch.zeros(TOKENS, device=DEVICE)
    kernel = select_backend(x.device)[1].token_influence
    seconds = benchmark.pedantic(lambda: cuda_time(lambda: kernel(x, h, grad_y, grad_h, val_A, val_B, 1.0, out)),
                                 rounds=1, iterations=1)
    moved = sum(t.numel() * t.element_size() for t in (x, h, grad_y, grad_h, val_A, val_B)) + 2 * out.numel() * 4
    row = RESULTS.setdefault("kernel bandwidth", {})
    row[f"{backend} {shape}"] = {"seconds": seconds, "GBps": moved / seconds / 1e9}
    save_results()
