// Per-token LoRA influence:
//   out[t] += sum_j grad_h[t, j] a[t, j] + scaling * sum_j h[t, j] b[t, j],
//   a = x val_A^T (n x r),  b = grad_y val_B (n x r)
// Same math as ippo/kernels/triton_influence.py. Two kernels:
//  * token_influence_tc_kernel: fp16/bf16 operands on tensor cores (WMMA m16n16k16, exact products, fp32
//    accumulation), sm_80+. A block owns 32 tokens; its warps split the feature dimension (split-K
//    inside the block), each warp streams its own tiles through warp-private shared memory, folds its
//    partial a / b into partial token scores (linear in a and b), and the warps' partials are summed in
//    a fixed order: deterministic, no atomics.
//  * token_influence_kernel<A>: any dtype mix, CUDA-core FMAs in A = float or double.
// Ranks are processed in chunks (64 for the tensor-core kernel, 16 for the generic one); each chunk
// adds its share to out, so any r >= 1 works.
#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "common.cuh"

namespace ippo {
namespace {

// ---- tensor-core kernel ---------------------------------------------------------------------------

constexpr int kTcMT = 2;               // 16-token tiles per block
constexpr int kTcBN = 16 * kTcMT;      // tokens per block
constexpr int kTcBK = 32;              // feature columns per warp step
constexpr int kTcLdx = kTcBK + 8;      // padded leading dim of the token tiles (multiple of 8)

__host__ __device__ constexpr int tc_warps(int rt) { return rt <= 2 ? 8 : 4; }

// Copy a ROWS x COLS tile of 16-bit values (element (i, k) at g[i * s0 + k * s1]) into shared memory
// (row-major, leading dim ld), zero outside rows_valid x cols_valid. One warp, 8 elements per slot;
// 16-byte vector loads when vec_ok (s1 == 1, g and s0 16-byte aligned).
template <int ROWS, int COLS>
__device__ __forceinline__ void warp_load_tile(uint16_t* s, int ld, const uint16_t* g, int64_t s0, int64_t s1,
                                               int rows_valid, int cols_valid, bool vec_ok, int lane) {
  static_assert(COLS % 8 == 0, "tile width must be a multiple of 8");
  constexpr int kVecPerRow = COLS / 8;
#pragma unroll
  for (int v = lane; v < ROWS * kVecPerRow; v += 32) {
    const int i = v / kVecPerRow;
    const int k = (v % kVecPerRow) * 8;
    uint16_t* dst = s + i * ld + k;
    if (vec_ok && i < rows_valid && k + 8 <= cols_valid) {
      *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(g + i * s0 + k));
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        dst[e] = (i < rows_valid && k + e < cols_valid) ? g[i * s0 + static_cast<int64_t>(k + e) * s1] : uint16_t(0);
      }
    }
  }
}

template <class T, int RT>
__global__ void __launch_bounds__(32 * tc_warps(RT))
token_influence_tc_kernel(Mat x, Mat h, Mat gy, Mat gh, Mat va, Mat vb, float* __restrict__ out,
                          int64_t out_stride, int64_t n, int d_in, int d_out, int rc, float scaling, bool vec_x,
                          bool vec_gy, bool vec_va, bool vec_vb) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int kWarps = tc_warps(RT);
  constexpr int kRP = 16 * RT;                         // padded rank chunk
  constexpr int kLdva = kTcBK + 8;                     // val_A tile: [kRP][kLdva], k contiguous
  constexpr int kLdvb = kRP + 8;                       // val_B tile: [kTcBK][kLdvb], ranks contiguous
  constexpr int kXElems = kTcBN * kTcLdx;
  constexpr int kVElems = kRP * kLdva > kTcBK * kLdvb ? kRP * kLdva : kTcBK * kLdvb;
  constexpr int kWarpElems = (kXElems + kVElems + 15) / 16 * 16;  // keep 32-byte alignment per warp
  static_assert(kXElems * 2 >= 16 * 16 * 4, "staging tile must fit in the token tile");
  __shared__ __align__(128) uint16_t smem[kWarps * kWarpElems];
  __shared__ float partial[kWarps][kTcBN];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  uint16_t* sx = smem + warp * kWarpElems;
  uint16_t* sv = sx + kXElems;
  float* stage = reinterpret_cast<float*>(sx);  // 16 x 16 fp32, reuses the token tile after the k loop
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTcBN;
  const int rows_valid = static_cast<int>(n - row0 < kTcBN ? n - row0 : kTcBN);
  // Each lane folds (token lane / 2, ranks 8 * (lane % 2) .. +8) of every 16 x 16 accumulator tile.
  const int ft = lane >> 1;
  const int fh = (lane & 1) * 8;

  float part_a[kTcMT];
  float part_b[kTcMT];
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

  // Fold accumulators acc[mt][nt] (tokens x ranks) against coef (n x rc) into part[mt].
  auto fold = [&](Acc (&acc)[kTcMT][RT], const Mat& coef, float (&part)[kTcMT]) {
#pragma unroll
    for (int mt = 0; mt < kTcMT; ++mt) {
      part[mt] = 0.f;
#pragma unroll
      for (int nt = 0; nt < RT; ++nt) {
        wmma::store_matrix_sync(stage, acc[mt][nt], 16, wmma::mem_row_major);
        __syncwarp();
        const int t = mt * 16 + ft;
        if (t < rows_valid) {
          const int64_t row = row0 + t;
          float s = 0.f;
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const int j = nt * 16 + fh + e;
            if (j < rc) s += stage[ft * 16 + fh + e] * load_as<float>(coef.ptr, coef.dtype, row * coef.s0 + j * coef.s1);
          }
          part[mt] += s;
        }
        __syncwarp();
      }
    }
  };

  // a = x val_A^T over this warp's feature steps.
  {
    Acc acc[kTcMT][RT];
#pragma unroll
    for (int mt = 0; mt < kTcMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < RT; ++nt) wmma::fill_fragment(acc[mt][nt], 0.f);
    const uint16_t* xg = static_cast<const uint16_t*>(x.ptr) + row0 * x.s0;
    const uint16_t* vg = static_cast<const uint16_t*>(va.ptr);
    for (int k0 = warp * kTcBK; k0 < d_in; k0 += kWarps * kTcBK) {
      const int kv = d_in - k0 < kTcBK ? d_in - k0 : kTcBK;
      warp_load_tile<kTcBN, kTcBK>(sx, kTcLdx, xg + k0 * x.s1, x.s0, x.s1, rows_valid, kv, vec_x, lane);
      warp_load_tile<kRP, kTcBK>(sv, kLdva, vg + k0 * va.s1, va.s0, va.s1, rc, kv, vec_va, lane);
      __syncwarp();
#pragma unroll
      for (int ks = 0; ks < kTcBK; ks += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[kTcMT];
#pragma unroll
        for (int mt = 0; mt < kTcMT; ++mt)
          wmma::load_matrix_sync(fa[mt], reinterpret_cast<const T*>(sx + mt * 16 * kTcLdx + ks), kTcLdx);
#pragma unroll
        for (int nt = 0; nt < RT; ++nt) {
          // B(k, j) = val_A[j, k]: the [rank][k] tile read column-major.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, reinterpret_cast<const T*>(sv + nt * 16 * kLdva + ks), kLdva);
#pragma unroll
          for (int mt = 0; mt < kTcMT; ++mt) wmma::mma_sync(acc[mt][nt], fa[mt], fb, acc[mt][nt]);
        }
      }
      __syncwarp();
    }
    fold(acc, gh, part_a);
  }

  // b = grad_y val_B.
  {
    Acc acc[kTcMT][RT];
#pragma unroll
    for (int mt = 0; mt < kTcMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < RT; ++nt) wmma::fill_fragment(acc[mt][nt], 0.f);
    const uint16_t* gg = static_cast<const uint16_t*>(gy.ptr) + row0 * gy.s0;
    const uint16_t* vg = static_cast<const uint16_t*>(vb.ptr);
    for (int k0 = warp * kTcBK; k0 < d_out; k0 += kWarps * kTcBK) {
      const int kv = d_out - k0 < kTcBK ? d_out - k0 : kTcBK;
      warp_load_tile<kTcBN, kTcBK>(sx, kTcLdx, gg + k0 * gy.s1, gy.s0, gy.s1, rows_valid, kv, vec_gy, lane);
      warp_load_tile<kTcBK, kRP>(sv, kLdvb, vg + k0 * vb.s0, vb.s0, vb.s1, kv, rc, vec_vb, lane);
      __syncwarp();
#pragma unroll
      for (int ks = 0; ks < kTcBK; ks += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[kTcMT];
#pragma unroll
        for (int mt = 0; mt < kTcMT; ++mt)
          wmma::load_matrix_sync(fa[mt], reinterpret_cast<const T*>(sx + mt * 16 * kTcLdx + ks), kTcLdx);
#pragma unroll
        for (int nt = 0; nt < RT; ++nt) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, reinterpret_cast<const T*>(sv + ks * kLdvb + nt * 16), kLdvb);
#pragma unroll
          for (int mt = 0; mt < kTcMT; ++mt) wmma::mma_sync(acc[mt][nt], fa[mt], fb, acc[mt][nt]);
        }
      }
      __syncwarp();
    }
    fold(acc, h, part_b);
  }

#pragma unroll
  for (int mt = 0; mt < kTcMT; ++mt) {
    float t = part_a[mt] + scaling * part_b[mt];
    t += __shfl_xor_sync(0xffffffffu, t, 1);
    if ((lane & 1) == 0) partial[warp][mt * 16 + ft] = t;
  }
  __syncthreads();
  if (threadIdx.x < rows_valid) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += partial[w][threadIdx.x];
    out[(row0 + threadIdx.x) * out_stride] += s;
  }
#endif
}

// ---- generic kernel (any dtype mix; fp32 or fp64 accumulation) ------------------------------------

constexpr int kGenBN = 16;  // tokens per block
constexpr int kGenRB = 16;  // ranks per launch
constexpr int kGenBK = 32;  // feature columns per step

template <class A>
__global__ void __launch_bounds__(kGenBN * kGenRB)
token_influence_kernel(Mat x, Mat h, Mat gy, Mat gh, Mat va, Mat vb, A* __restrict__ out, int64_t out_stride,
                       int64_t n, int d_in, int d_out, int rc, A scaling) {
  __shared__ A sx[kGenBN][kGenBK + 1];
  __shared__ A sv[kGenRB][kGenBK + 1];
  const int tid = threadIdx.x;
  const int t = tid / kGenRB;  // token of this thread
  const int j = tid % kGenRB;  // rank of this thread
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kGenBN;
  const int rows_valid = static_cast<int>(n - row0 < kGenBN ? n - row0 : kGenBN);
  constexpr int kThreads = kGenBN * kGenRB;

  // a[t, j] = sum_k x[t, k] val_A[j, k]; per-step partial sums keep fp32 rounding error ~ (BK + d / BK) eps.
  A acc = 0;
  for (int k0 = 0; k0 < d_in; k0 += kGenBK) {
    for (int e = tid; e < kGenBN * kGenBK; e += kThreads) {
      const int i = e / kGenBK, k = e % kGenBK;
      sx[i][k] = (i < rows_valid && k0 + k < d_in)
                     ? load_as<A>(x.ptr, x.dtype, (row0 + i) * x.s0 + static_cast<int64_t>(k0 + k) * x.s1) : A(0);
    }
    for (int e = tid; e < kGenRB * kGenBK; e += kThreads) {
      const int jj = e / kGenBK, k = e % kGenBK;
      sv[jj][k] = (jj < rc && k0 + k < d_in)
                      ? load_as<A>(va.ptr, va.dtype, jj * va.s0 + static_cast<int64_t>(k0 + k) * va.s1) : A(0);
    }
    __syncthreads();
    A step = 0;
#pragma unroll 8
    for (int k = 0; k < kGenBK; ++k) step += sx[t][k] * sv[j][k];
    acc += step;
    __syncthreads();
  }
  A tok = 0;
  if (t < rows_valid && j < rc) tok = acc * load_as<A>(gh.ptr, gh.dtype, (row0 + t) * gh.s0 + j * gh.s1);

  // b[t, j] = sum_k grad_y[t, k] val_B[k, j].
  acc = 0;
  for (int k0 = 0; k0 < d_out; k0 += kGenBK) {
    for (int e = tid; e < kGenBN * kGenBK; e += kThreads) {
      const int i = e / kGenBK, k = e % kGenBK;
      sx[i][k] = (i < rows_valid && k0 + k < d_out)
                     ? load_as<A>(gy.ptr, gy.dtype, (row0 + i) * gy.s0 + static_cast<int64_t>(k0 + k) * gy.s1) : A(0);
    }
    for (int e = tid; e < kGenRB * kGenBK; e += kThreads) {
      const int k = e / kGenRB, jj = e % kGenRB;  // ranks fastest: val_B is usually rank-contiguous
      sv[jj][k] = (jj < rc && k0 + k < d_out)
                      ? load_as<A>(vb.ptr, vb.dtype, static_cast<int64_t>(k0 + k) * vb.s0 + jj * vb.s1) : A(0);
    }
    __syncthreads();
    A step = 0;
#pragma unroll 8
    for (int k = 0; k < kGenBK; ++k) step += sx[t][k] * sv[j][k];
    acc += step;
    __syncthreads();
  }
  if (t < rows_valid && j < rc) tok += scaling * (acc * load_as<A>(h.ptr, h.dtype, (row0 + t) * h.s0 + j * h.s1));

  // Sum over the 16 ranks of each token (16 consecutive lanes).
#pragma unroll
  for (int off = kGenRB / 2; off > 0; off /= 2) tok += __shfl_xor_sync(0xffffffffu, tok, off);
  if (j == 0 && t < rows_valid) out[(row0 + t) * out_stride] += tok;
}

// ---- host side --------------------------------------------------------------------------------------

Mat offset(Mat m, int64_t elements) {
  m.ptr = static_cast<const char*>(m.ptr) + elements * dtype_size(m.dtype);
  return m;
}

// 16-byte vector loads along dim 1: unit stride, 16-byte aligned base and row pitch (16-bit dtypes).
bool vec_ok(const Mat& m) {
  return m.s1 == 1 && (reinterpret_cast<uintptr_t>(m.ptr) % 16) == 0 && (m.s0 * 2) % 16 == 0;
}

template <class T, int RT>
void launch_tc_chunk(const Mat& x, const Mat& h, const Mat& gy, const Mat& gh, const Mat& va, const Mat& vb,
                     float* out, int64_t out_stride, int64_t n, int d_in, int d_out, int rc, float scaling,
                     cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(n, kTcBN)));
  token_influence_tc_kernel<T, RT><<<grid, 32 * tc_warps(RT), 0, stream>>>(
      x, h, gy, gh, va, vb, out, out_stride, n, d_in, d_out, rc, scaling, vec_ok(x), vec_ok(gy), vec_ok(va),
      // val_B tiles are [k][rank]: vectorized along ranks.
      vec_ok(vb));
}

template <class T>
cudaError_t launch_tc(Mat x, Mat h, Mat gy, Mat gh, Mat va, Mat vb, float* out, int64_t out_stride, int64_t n,
                      int d_in, int d_out, int64_t r, float scaling, cudaStream_t stream) {
  for (int64_t r0 = 0; r0 < r; r0 += 64) {
    const int rc = static_cast<int>(std::min<int64_t>(64, r - r0));
    const Mat hc = offset(h, r0 * h.s1), ghc = offset(gh, r0 * gh.s1);
    const Mat vac = offset(va, r0 * va.s0), vbc = offset(vb, r0 * vb.s1);
    if (rc <= 16) {
      launch_tc_chunk<T, 1>(x, hc, gy, ghc, vac, vbc, out, out_stride, n, d_in, d_out, rc, scaling, stream);
    } else if (rc <= 32) {
      launch_tc_chunk<T, 2>(x, hc, gy, ghc, vac, vbc, out, out_stride, n, d_in, d_out, rc, scaling, stream);
    } else {
      launch_tc_chunk<T, 4>(x, hc, gy, ghc, vac, vbc, out, out_stride, n, d_in, d_out, rc, scaling, stream);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <class A>
cudaError_t launch_generic(Mat x, Mat h, Mat gy, Mat gh, Mat va, Mat vb, A* out, int64_t out_stride, int64_t n,
                           int d_in, int d_out, int64_t r, A scaling, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(n, kGenBN)));
  for (int64_t r0 = 0; r0 < r; r0 += kGenRB) {
    const int rc = static_cast<int>(std::min<int64_t>(kGenRB, r - r0));
    token_influence_kernel<A><<<grid, kGenBN * kGenRB, 0, stream>>>(
        x, offset(h, r0 * h.s1), gy, offset(gh, r0 * gh.s1), offset(va, r0 * va.s0), offset(vb, r0 * vb.s1), out,
        out_stride, n, d_in, d_out, rc, scaling);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_token_influence(Mat x, Mat h, Mat gy, Mat gh, Mat va, Mat vb, void* out, int out_dtype,
                                   int64_t out_stride, int64_t n, int64_t d_in, int64_t d_out, int64_t r,
                                   double scaling, int cc_major, cudaStream_t stream) {
  if (n <= 0 || r <= 0) return cudaSuccess;
  if (d_in > INT32_MAX || d_out > INT32_MAX || ceil_div(n, kGenBN) > INT32_MAX) return cudaErrorInvalidValue;
  const int di = static_cast<int>(d_in), dout = static_cast<int>(d_out);
  const int dt = x.dtype;
  const bool same16 = (dt == kF16 || dt == kBF16) && gy.dtype == dt && va.dtype == dt && vb.dtype == dt;
  if (out_dtype == kF32 && same16 && cc_major >= 8) {
    float* o = static_cast<float*>(out);
    const float s = static_cast<float>(scaling);
    return dt == kF16 ? launch_tc<__half>(x, h, gy, gh, va, vb, o, out_stride, n, di, dout, r, s, stream)
                      : launch_tc<__nv_bfloat16>(x, h, gy, gh, va, vb, o, out_stride, n, di, dout, r, s, stream);
  }
  if (out_dtype == kF64) {
    return launch_generic<double>(x, h, gy, gh, va, vb, static_cast<double*>(out), out_stride, n, di, dout, r,
                                  scaling, stream);
  }
  return launch_generic<float>(x, h, gy, gh, va, vb, static_cast<float*>(out), out_stride, n, di, dout, r,
                               static_cast<float>(scaling), stream);
}

}  // namespace ippo
