"""One command for a GPU session: parity checks of the cuda backend, then cuda vs triton timings.

    python benchmarks/run_cuda_parity.py OUT_DIR          (after IPPO_BUILD_CUDA=1 pip install -e .)

Builds nothing. Runs tests/test_cuda_backend.py (pytest), checks parity at the benchmark shapes, times
``token_influence`` of the cuda, triton and torch backends for N = 16 * 512 bf16 tokens, prints a
table and writes OUT_DIR/cuda_parity.json.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_TOKENS = 16 * 512
SHAPES = [(576, 576, 16), (576, 1536, 16), (1536, 1536, 16), (1536, 8960, 16)]


def run_tests() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "0"  # compiled triton on the GPU
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-x", "tests/test_cuda_backend.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr)[-6000:]
    print(tail)
    return {"returncode": proc.returncode, "seconds": round(time.monotonic() - start, 1), "output_tail": tail}


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_INTERPRET"] = "0"
    import torch

    from ippo.kernels import cuda_backend, torch_backend, triton_backend

    result: dict = {"python": platform.python_version(), "torch": torch.__version__,
                    "cuda_backend": cuda_backend.describe(), "build_problem": cuda_backend.build_problem()}
    print("cuda backend:", result["cuda_backend"])
    if not torch.cuda.is_available() or result["build_problem"] is not None:
        print("no usable CUDA device / extension; nothing to time")
        (out_dir / "cuda_parity.json").write_text(json.dumps(result, indent=2))
        return 1
    from ippo import _C

    result.update(device=torch.cuda.get_device_name(), driver=_C.driver_version(), ext_cuda=_C.cuda_version,
                  archs=list(_C.archs))
    result["pytest"] = run_tests()

    import triton.testing

    backends = {"cuda": cuda_backend, "triton": triton_backend, "torch": torch_backend}
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for d_in, d_out, r in SHAPES:
        n = N_TOKENS
        dt = torch.bfloat16
        t = dict(x=torch.randn(n, d_in, device="cuda", generator=g).to(dt),
                 h=torch.randn(n, r, device="cuda", generator=g).to(dt),
                 grad_y=torch.randn(n, d_out, device="cuda", generator=g).to(dt),
                 grad_h=torch.randn(n, r, device="cuda", generator=g).to(dt),
                 val_A=torch.randn(r, d_in, device="cuda", generator=g).to(dt),
                 val_B=torch.randn(d_out, r, device="cuda", generator=g).to(dt))
        a64 = {k: v.double() for k, v in t.items()}
        def definition(a):
            return (a["grad_h"] * (a["x"] @ a["val_A"].T)).sum(-1) + (a["h"] * (a["grad_y"] @ a["val_B"])).sum(-1)

        ref, eager = definition(a64), definition(t).double()
        row = {"N": n, "d_in": d_in, "d_out": d_out, "r": r, "dtype": "bf16",
               "eager_bf16_max_err": (eager - ref).abs().max().item()}
        bytes_moved = n * (d_in + d_out + 2 * r) * 2 + (d_in + d_out) * r * 2 + n * 4 * 2
        for name, mod in backends.items():
            out = torch.zeros(n, device="cuda")
            mod.token_influence(*t.values(), 1.0, out)
            torch.cuda.synchronize()
            row[f"{name}_max_err"] = (out.double() - ref).abs().max().item()
            ms = triton.testing.do_bench(functools.partial(mod.token_influence, *t.values(), 1.0, out),
                                         warmup=25, rep=200)
            row[f"{name}_ms"] = ms
            row[f"{name}_GBps"] = bytes_moved / ms / 1e6
        row["parity_ok"] = row["cuda_max_err"] <= 2 * row["eager_bf16_max_err"] + 1e-3
        row["cuda_vs_triton_speedup"] = row["triton_ms"] / row["cuda_ms"]
        rows.append(row)
    result["timings"] = rows

    header = f"{'d_in':>5} {'d_out':>5} {'r':>3} | {'cuda ms':>8} {'triton ms':>9} {'torch ms':>8} | " \
             f"{'cuda GB/s':>9} {'speedup':>7} | {'cuda err':>9} {'triton err':>10} {'eager err':>9} ok"
    print(f"\ntoken_influence, N = {N_TOKENS}, bf16, {result['device']}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['d_in']:>5} {r['d_out']:>5} {r['r']:>3} | {r['cuda_ms']:>8.4f} {r['triton_ms']:>9.4f} "
              f"{r['torch_ms']:>8.4f} | {r['cuda_GBps']:>9.0f} {r['cuda_vs_triton_speedup']:>7.2f} | "
              f"{r['cuda_max_err']:>9.2e} {r['triton_max_err']:>10.2e} {r['eager_bf16_max_err']:>9.2e} "
              f"{'yes' if r['parity_ok'] else 'NO'}")
    (out_dir / "cuda_parity.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out_dir / 'cuda_parity.json'}")
    ok = result["pytest"]["returncode"] == 0 and all(r["parity_ok"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
