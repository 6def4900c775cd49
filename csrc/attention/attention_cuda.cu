// CUDA kernels of the fused LRP attention (math in attention.h), registered under the CUDA dispatch
// key; both entry points run the shared checks (attention.cpp) first. Three kernels, each a tile
// loop over recomputed scores:
//   forward:  a warp per query row, a lane per key of a 32-key tile; online softmax (running max m
//             and sum l), O = P V accumulated with each lane owning head_dim / 32 output columns.
//   dq:       the same loop with p = exp(s - m - log l) from the saved statistics,
//             dS = p (dO . v - delta), dQ += dS k.                                  (AttnLRP only)
//   dkv:      a warp per key, a lane per query row of a 32-row tile, looping over every query head
//             of the key's group: dV += p dO and (AttnLRP) dK += dS q. Each key is owned by one
//             warp, so nothing needs atomics and dK, dV sum over the group in registers.
// Tiles of K and V (forward, dq) or Q and dO (dkv) go through shared memory as the accumulation
// type, padded to head_dim + 1 columns where a lane walks a row, so lanes hit distinct banks.
// Extra memory: O, the statistics (two numbers per query row) and delta = rowsum(dO * O).
#include "attention/attention.h"
#include "attention/math.h"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace lxt_ext {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 32;  // keys per tile (forward, dq) and query rows per tile (dkv): one per lane
constexpr unsigned kFull = 0xffffffffu;

// kAddMask: additive in the query's dtype; kAccMask: additive in the accumulation dtype (half queries).
enum MaskKind { kNoMask = 0, kBoolMask = 1, kAddMask = 2, kAccMask = 3 };

template <typename scalar_t, typename acc_t>
struct Params {
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  const scalar_t* dout;
  const void* mask;
  int64_t qs[3], ks[3], vs[3], ds[3];  // batch, head and token strides (head_dim is unit-stride)
  int64_t ms[4];                       // mask strides over (B, Hq, Nq, Nk); 0 where broadcast
  int mask_kind;
  int Hq, Hkv, Nq, Nk, D, group;
  acc_t scale;
  bool causal;
};

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return static_cast<T>(-INFINITY);
}
__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T warp_max(T x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T y = __shfl_xor_sync(kFull, x, offset);
    x = y > x ? y : x;
  }
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFull, x, offset);
  return x;
}

// scale q.k of query i and key j of head (b, h), with the mask added or applied; -inf if hidden.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t masked_score(const Params<scalar_t, acc_t>& p, acc_t dot, int64_t b, int h, int i,
                                              int j) {
  if (p.causal && j > i) return neg_inf<acc_t>();
  acc_t s = dot * p.scale;
  if (p.mask_kind != kNoMask) {
    const int64_t off = b * p.ms[0] + h * p.ms[1] + i * p.ms[2] + j * p.ms[3];
    if (p.mask_kind == kBoolMask) {
      if (!static_cast<const bool*>(p.mask)[off]) return neg_inf<acc_t>();
    } else if (p.mask_kind == kAddMask) {
      s += static_cast<acc_t>(static_cast<const scalar_t*>(p.mask)[off]);
    } else {
      s += static_cast<const acc_t*>(p.mask)[off];
    }
  }
  return s;
}

// Rows [first, first + rows) of head `head` of batch `b` of a (B, H, tokens, D) tensor with strides
// s = (batch, head, token) into shared memory as acc_t, `pitch` values per row, zeros beyond the
// tokens and beyond D.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_rows(acc_t* dst, const scalar_t* base, const int64_t* s, int64_t b, int head,
                                          int first, int tokens, int rows, int D, int cols, int pitch) {
  const scalar_t* src = base + b * s[0] + head * s[1];
  for (int idx = threadIdx.x; idx < rows * cols; idx += kThreads) {
    const int r = idx / cols, d = idx % cols, t = first + r;
    dst[r * pitch + d] = (t < tokens && d < D) ? static_cast<acc_t>(src[t * s[2] + d]) : acc_t(0);
  }
}

template <int kD, int kRows, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const Params<scalar_t, acc_t> p, scalar_t* __restrict__ out, acc_t* __restrict__ stats) {
  constexpr int kBlockRows = kWarps * kRows, kCols = kD / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* qsm = reinterpret_cast<acc_t*>(smem);  // [kBlockRows][kD]
  acc_t* ksm = qsm + kBlockRows * kD;            // [kTile][kD + 1]
  acc_t* vsm = ksm + kTile * (kD + 1);           // [kTile][kD + 1]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.z;
  const int h = blockIdx.y, kvh = h / p.group, row0 = blockIdx.x * kBlockRows;
  load_rows(qsm, p.q, p.qs, b, h, row0, p.Nq, kBlockRows, p.D, kD, kD);

  acc_t m[kRows], l[kRows], o[kRows][kCols];
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) {
    m[rr] = neg_inf<acc_t>();
    l[rr] = 0;
#pragma unroll
    for (int c = 0; c < kCols; ++c) o[rr][c] = 0;
  }
  const int row_end = min(p.Nq, row0 + kBlockRows);
  const int key_end = p.causal ? min(p.Nk, row_end) : p.Nk;
  for (int j0 = 0; j0 < key_end; j0 += kTile) {
    __syncthreads();  // the previous tile is consumed
    load_rows(ksm, p.k, p.ks, b, kvh, j0, p.Nk, kTile, p.D, kD, kD + 1);
    load_rows(vsm, p.v, p.vs, b, kvh, j0, p.Nk, kTile, p.D, kD, kD + 1);
    __syncthreads();
    const int j = j0 + lane;
#pragma unroll
    for (int rr = 0; rr < kRows; ++rr) {
      const int r = warp * kRows + rr, i = row0 + r;
      if (i < p.Nq) {  // warp-uniform
        acc_t s = neg_inf<acc_t>();
        if (j < p.Nk) {
          acc_t dot = 0;
          for (int d = 0; d < p.D; ++d) dot += qsm[r * kD + d] * ksm[lane * (kD + 1) + d];
          s = masked_score(p, dot, b, h, i, j);
        }
        const acc_t tile_max = warp_max(s);
        const acc_t m_new = tile_max > m[rr] ? tile_max : m[rr];
        // While the row has seen no key, m = -inf: shift by 0 so that exp gives exactly 0.
        const acc_t shift = m_new == neg_inf<acc_t>() ? acc_t(0) : m_new;
        const acc_t pj = dev_exp(s - shift);
        const acc_t alpha = dev_exp(m[rr] - shift);
        l[rr] = l[rr] * alpha + warp_sum(pj);
#pragma unroll
        for (int c = 0; c < kCols; ++c) o[rr][c] *= alpha;
#pragma unroll 8
        for (int jj = 0; jj < kTile; ++jj) {
          const acc_t pjj = __shfl_sync(kFull, pj, jj);
#pragma unroll
          for (int c = 0; c < kCols; ++c) o[rr][c] += pjj * vsm[jj * (kD + 1) + lane + 32 * c];
        }
        m[rr] = m_new;
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) {
    const int i = row0 + warp * kRows + rr;
    if (i < p.Nq) {
      const int64_t row = (b * p.Hq + h) * p.Nq + i;
      const acc_t inv = l[rr] > 0 ? acc_t(1) / l[rr] : acc_t(0);
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = lane + 32 * c;
        if (d < p.D) out[row * p.D + d] = static_cast<scalar_t>(o[rr][c] * inv);
      }
      if (lane == 0) {
        stats[2 * row] = m[rr];
        stats[2 * row + 1] = l[rr] > 0 ? dev_log(l[rr]) : acc_t(0);
      }
    }
  }
}

// The softmax shift of a query row for backward: its max, or +inf where the row saw no key
// (then every p = exp(-inf) = 0).
template <typename acc_t>
__device__ __forceinline__ acc_t backward_shift(acc_t m) {
  return m == neg_inf<acc_t>() ? static_cast<acc_t>(INFINITY) : m;
}

template <int kD, int kRows, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dq_kernel(const Params<scalar_t, acc_t> p, const acc_t* __restrict__ stats, const acc_t* __restrict__ delta,
              scalar_t* __restrict__ dq) {
  constexpr int kBlockRows = kWarps * kRows, kCols = kD / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* qsm = reinterpret_cast<acc_t*>(smem);  // [kBlockRows][kD]
  acc_t* dosm = qsm + kBlockRows * kD;           // [kBlockRows][kD]
  acc_t* ksm = dosm + kBlockRows * kD;           // [kTile][kD + 1]
  acc_t* vsm = ksm + kTile * (kD + 1);           // [kTile][kD + 1]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.z;
  const int h = blockIdx.y, kvh = h / p.group, row0 = blockIdx.x * kBlockRows;
  load_rows(qsm, p.q, p.qs, b, h, row0, p.Nq, kBlockRows, p.D, kD, kD);
  load_rows(dosm, p.dout, p.ds, b, h, row0, p.Nq, kBlockRows, p.D, kD, kD);

  acc_t shift[kRows], log_l[kRows], dlt[kRows], acc[kRows][kCols];
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) {
    const int i = row0 + warp * kRows + rr;
    const int64_t row = (b * p.Hq + h) * p.Nq + i;
    shift[rr] = i < p.Nq ? backward_shift(stats[2 * row]) : acc_t(0);
    log_l[rr] = i < p.Nq ? stats[2 * row + 1] : acc_t(0);
    dlt[rr] = i < p.Nq ? delta[row] : acc_t(0);
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[rr][c] = 0;
  }
  const int row_end = min(p.Nq, row0 + kBlockRows);
  const int key_end = p.causal ? min(p.Nk, row_end) : p.Nk;
  for (int j0 = 0; j0 < key_end; j0 += kTile) {
    __syncthreads();
    load_rows(ksm, p.k, p.ks, b, kvh, j0, p.Nk, kTile, p.D, kD, kD + 1);
    load_rows(vsm, p.v, p.vs, b, kvh, j0, p.Nk, kTile, p.D, kD, kD + 1);
    __syncthreads();
    const int j = j0 + lane;
#pragma unroll
    for (int rr = 0; rr < kRows; ++rr) {
      const int r = warp * kRows + rr, i = row0 + r;
      if (i < p.Nq) {  // warp-uniform
        acc_t ds = 0;
        if (j < p.Nk) {
          acc_t dot = 0, dp = 0;
          for (int d = 0; d < p.D; ++d) {
            dot += qsm[r * kD + d] * ksm[lane * (kD + 1) + d];
            dp += dosm[r * kD + d] * vsm[lane * (kD + 1) + d];
          }
          const acc_t pj = dev_exp(masked_score(p, dot, b, h, i, j) - shift[rr] - log_l[rr]);
          ds = pj * (dp - dlt[rr]);
        }
#pragma unroll 8
        for (int jj = 0; jj < kTile; ++jj) {
          const acc_t dsj = __shfl_sync(kFull, ds, jj);
#pragma unroll
          for (int c = 0; c < kCols; ++c) acc[rr][c] += dsj * ksm[jj * (kD + 1) + lane + 32 * c];
        }
      }
    }
  }
  const acc_t factor = p.scale * acc_t(kAttnLRPQueryKeyFactor);
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) {
    const int i = row0 + warp * kRows + rr;
    if (i < p.Nq) {
      const int64_t row = (b * p.Hq + h) * p.Nq + i;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = lane + 32 * c;
        if (d < p.D) dq[row * p.D + d] = static_cast<scalar_t>(acc[rr][c] * factor);
      }
    }
  }
}

template <int kD, int kKeys, bool kDvOnly, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dkv_kernel(const Params<scalar_t, acc_t> p, const acc_t* __restrict__ stats, const acc_t* __restrict__ delta,
               scalar_t* __restrict__ dk, scalar_t* __restrict__ dv) {
  constexpr int kBlockKeys = kWarps * kKeys, kCols = kD / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* ksm = reinterpret_cast<acc_t*>(smem);  // [kBlockKeys][kD] (read as broadcasts)
  acc_t* vsm = ksm + kBlockKeys * kD;            // [kBlockKeys][kD]
  acc_t* qsm = vsm + kBlockKeys * kD;            // [kTile][kD + 1]
  acc_t* dosm = qsm + kTile * (kD + 1);          // [kTile][kD + 1]
  acc_t* rowsm = dosm + kTile * (kD + 1);        // [kTile][3]: shift, log l, delta
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.z;
  const int kvh = blockIdx.y, key0 = blockIdx.x * kBlockKeys;
  load_rows(ksm, p.k, p.ks, b, kvh, key0, p.Nk, kBlockKeys, p.D, kD, kD);
  load_rows(vsm, p.v, p.vs, b, kvh, key0, p.Nk, kBlockKeys, p.D, kD, kD);

  acc_t dk_acc[kKeys][kCols], dv_acc[kKeys][kCols];
#pragma unroll
  for (int kk = 0; kk < kKeys; ++kk) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) dk_acc[kk][c] = dv_acc[kk][c] = 0;
  }
  // Causal: key j is seen by query rows i >= j only.
  const int first_row = p.causal ? key0 / kTile * kTile : 0;
  for (int g = 0; g < p.group; ++g) {
    const int h = kvh * p.group + g;
    for (int i0 = first_row; i0 < p.Nq; i0 += kTile) {
      __syncthreads();
      load_rows(qsm, p.q, p.qs, b, h, i0, p.Nq, kTile, p.D, kD, kD + 1);
      load_rows(dosm, p.dout, p.ds, b, h, i0, p.Nq, kTile, p.D, kD, kD + 1);
      if (threadIdx.x < kTile) {
        const int i = i0 + threadIdx.x;
        const int64_t row = (b * p.Hq + h) * p.Nq + i;
        // Rows past the end get shift +inf, so their p is 0.
        rowsm[3 * threadIdx.x] = i < p.Nq ? backward_shift(stats[2 * row]) : static_cast<acc_t>(INFINITY);
        rowsm[3 * threadIdx.x + 1] = i < p.Nq ? stats[2 * row + 1] : acc_t(0);
        rowsm[3 * threadIdx.x + 2] = (!kDvOnly && i < p.Nq) ? delta[row] : acc_t(0);
      }
      __syncthreads();
      const int i = i0 + lane;
#pragma unroll
      for (int kk = 0; kk < kKeys; ++kk) {
        const int jl = warp * kKeys + kk, j = key0 + jl;
        if (j < p.Nk) {  // warp-uniform
          acc_t pi = 0, ds = 0;
          if (i < p.Nq) {
            acc_t dot = 0;
            for (int d = 0; d < p.D; ++d) dot += qsm[lane * (kD + 1) + d] * ksm[jl * kD + d];
            pi = dev_exp(masked_score(p, dot, b, h, i, j) - rowsm[3 * lane] - rowsm[3 * lane + 1]);
            if (!kDvOnly) {
              acc_t dp = 0;
              for (int d = 0; d < p.D; ++d) dp += dosm[lane * (kD + 1) + d] * vsm[jl * kD + d];
              ds = pi * (dp - rowsm[3 * lane + 2]);
            }
          }
#pragma unroll 8
          for (int ii = 0; ii < kTile; ++ii) {
            const acc_t pii = __shfl_sync(kFull, pi, ii);
#pragma unroll
            for (int c = 0; c < kCols; ++c) dv_acc[kk][c] += pii * dosm[ii * (kD + 1) + lane + 32 * c];
            if (!kDvOnly) {
              const acc_t dsi = __shfl_sync(kFull, ds, ii);
#pragma unroll
              for (int c = 0; c < kCols; ++c) dk_acc[kk][c] += dsi * qsm[ii * (kD + 1) + lane + 32 * c];
            }
          }
        }
      }
    }
  }
  const acc_t v_factor = kDvOnly ? acc_t(1) : acc_t(kAttnLRPValueFactor), k_factor = p.scale * acc_t(kAttnLRPQueryKeyFactor);
#pragma unroll
  for (int kk = 0; kk < kKeys; ++kk) {
    const int j = key0 + warp * kKeys + kk;
    if (j < p.Nk) {
      const int64_t row = (b * p.Hkv + kvh) * p.Nk + j;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = lane + 32 * c;
        if (d < p.D) {
          dv[row * p.D + d] = static_cast<scalar_t>(dv_acc[kk][c] * v_factor);
          if (!kDvOnly) dk[row * p.D + d] = static_cast<scalar_t>(dk_acc[kk][c] * k_factor);
        }
      }
    }
  }
}

// Rows per warp (forward, dq) and keys per warp (dkv) for a head-dim bound: 16 register
// accumulators per lane and kind whatever the head dim.
constexpr int rows_per_warp(int d) { return 512 / d; }

// Unit stride along head_dim, as the kernels read rows with d as the fastest index.
at::Tensor rows_operand(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

template <typename scalar_t, typename acc_t>
Params<scalar_t, acc_t> make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& mask, const at::Tensor& dout, double scale, bool causal) {
  Params<scalar_t, acc_t> p{};
  p.q = q.data_ptr<scalar_t>();
  p.k = k.data_ptr<scalar_t>();
  p.v = v.data_ptr<scalar_t>();
  p.dout = dout.defined() ? dout.data_ptr<scalar_t>() : nullptr;
  for (int i = 0; i < 3; ++i) {
    p.qs[i] = q.stride(i);
    p.ks[i] = k.stride(i);
    p.vs[i] = v.stride(i);
    p.ds[i] = dout.defined() ? dout.stride(i) : 0;
  }
  p.mask_kind = !mask.defined()                          ? kNoMask
                : mask.scalar_type() == at::kBool          ? kBoolMask
                : mask.scalar_type() == q.scalar_type()    ? kAddMask
                                                           : kAccMask;
  p.mask = mask.defined() ? mask.data_ptr() : nullptr;
  for (int i = 0; i < 4; ++i) p.ms[i] = mask.defined() ? mask.stride(i) : 0;
  p.Hq = static_cast<int>(q.size(1));
  p.Hkv = static_cast<int>(k.size(1));
  p.Nq = static_cast<int>(q.size(2));
  p.Nk = static_cast<int>(k.size(2));
  p.D = static_cast<int>(q.size(3));
  p.group = p.Hq / p.Hkv;
  p.scale = static_cast<acc_t>(scale);
  p.causal = causal;
  return p;
}

void check_cuda_shapes(const char* op, const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.size(3) <= 256, op, ": the CUDA kernels take head_dim <= 256, got ", q.size(3));
  TORCH_CHECK(q.size(0) <= 65535 && q.size(1) <= 65535, op, ": the CUDA kernels take at most 65535 batches and ",
              "heads, got ", q.size(0), " and ", q.size(1));
  TORCH_CHECK(q.size(2) < (int64_t{1} << 31) && k.size(2) < (int64_t{1} << 31), op, ": too many tokens");
}

// Launches with `smem` bytes of dynamic shared memory, opting in beyond the default 48 KiB.
template <typename Kernel, typename... Args>
void launch(const char* op, Kernel kernel, dim3 grid, size_t smem, Args... args) {
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, c10::cuda::current_device()));
  TORCH_CHECK(smem <= static_cast<size_t>(limit), op, ": needs ", smem, " bytes of shared memory per block for this head_dim and dtype, ",
              "the device offers ", limit);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename F>
void dispatch_head_dim(int64_t d, F&& f) {
  if (d <= 64) {
    f(std::integral_constant<int, 64>{});
  } else if (d <= 128) {
    f(std::integral_constant<int, 128>{});
  } else {
    f(std::integral_constant<int, 256>{});
  }
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& query, const at::Tensor& key,
                                                          const at::Tensor& value,
                                                          const c10::optional<at::Tensor>& attn_mask, double scale,
                                                          bool is_causal) {
  const char* op = kForwardOp;
  const at::Tensor mask = check_forward(query, key, value, attn_mask).mask;
  const c10::cuda::CUDAGuard guard(query.device());
  check_cuda_shapes(op, query, key);
  const at::Tensor q = rows_operand(query), k = rows_operand(key), v = rows_operand(value);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const auto acc = acc_type(q);
  at::Tensor out = at::empty({B, Hq, Nq, D}, q.options());
  at::Tensor stats = at::empty({B, Hq, Nq, 2}, q.options().dtype(acc));
  if (out.numel() == 0 && stats.numel() == 0) return {out, stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "lxt_ext::attention_lrp_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = make_params<scalar_t, acc_t>(q, k, v, mask, at::Tensor(), scale, is_causal);
    dispatch_head_dim(D, [&](auto head_dim) {
      constexpr int kD = decltype(head_dim)::value, kRows = rows_per_warp(kD);
      const int block_rows = kWarps * kRows;
      const dim3 grid((Nq + block_rows - 1) / block_rows, Hq, B);
      const size_t smem = (block_rows * kD + 2 * kTile * (kD + 1)) * sizeof(acc_t);
      launch(op, forward_kernel<kD, kRows, scalar_t, acc_t>, grid, smem, p, out.data_ptr<scalar_t>(),
             stats.data_ptr<acc_t>());
    });
  });
  return {out, stats};
}

std::vector<at::Tensor> attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& query,
                                                const at::Tensor& key, const at::Tensor& value,
                                                const c10::optional<at::Tensor>& attn_mask, const at::Tensor& out,
                                                const at::Tensor& stats, double scale, bool is_causal, int64_t mode) {
  const char* op = kBackwardOp;
  const at::Tensor mask = check_backward(grad_out, query, key, value, attn_mask, out, stats, mode).mask;
  const bool cp = mode == kCP;
  const c10::cuda::CUDAGuard guard(query.device());
  check_cuda_shapes(op, query, key);
  const at::Tensor q = rows_operand(query), k = rows_operand(key), v = rows_operand(value);
  const at::Tensor dout = rows_operand(grad_out);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), Nk = k.size(2);
  const auto acc = stats.scalar_type();
  // rowsum(P * dP) = dO . O per query row (the rows of P sum to one, or are zero).
  const at::Tensor delta = cp ? at::Tensor() : (dout.to(acc) * out.to(acc)).sum(-1).contiguous();
  at::Tensor dq = cp ? at::Tensor() : at::empty({B, Hq, Nq, D}, q.options());
  at::Tensor dk = cp ? at::Tensor() : at::empty({B, Hkv, Nk, D}, q.options());
  at::Tensor dv = at::empty({B, Hkv, Nk, D}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "lxt_ext::attention_lrp_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = make_params<scalar_t, acc_t>(q, k, v, mask, dout, scale, is_causal);
    const acc_t* st = stats.data_ptr<acc_t>();
    const acc_t* dl = cp ? nullptr : delta.data_ptr<acc_t>();
    dispatch_head_dim(D, [&](auto head_dim) {
      constexpr int kD = decltype(head_dim)::value, kRows = rows_per_warp(kD);
      const int block_rows = kWarps * kRows;
      if (!cp && dq.numel() > 0) {
        const dim3 grid((Nq + block_rows - 1) / block_rows, Hq, B);
        const size_t smem = (2 * block_rows * kD + 2 * kTile * (kD + 1)) * sizeof(acc_t);
        launch(op, dq_kernel<kD, kRows, scalar_t, acc_t>, grid, smem, p, st, dl, dq.data_ptr<scalar_t>());
      }
      if (dv.numel() > 0) {
        const dim3 grid((Nk + block_rows - 1) / block_rows, Hkv, B);
        const size_t smem = (2 * block_rows * kD + 2 * kTile * (kD + 1) + 3 * kTile) * sizeof(acc_t);
        if (cp) {
          launch(op, dkv_kernel<kD, kRows, true, scalar_t, acc_t>, grid, smem, p, st, dl, static_cast<scalar_t*>(nullptr),
                 dv.data_ptr<scalar_t>());
        } else {
          launch(op, dkv_kernel<kD, kRows, false, scalar_t, acc_t>, grid, smem, p, st, dl, dk.data_ptr<scalar_t>(),
                 dv.data_ptr<scalar_t>());
        }
      }
    });
  });
  if (cp) return {dv};
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(lxt_ext, CUDA, m) {
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
}

}  // namespace lxt_ext
