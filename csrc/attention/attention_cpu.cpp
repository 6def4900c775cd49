// CPU kernels of the fused LRP attention (math in attention.h), registered under the CPU dispatch
// key; both entry points run the shared checks (attention.cpp) first.
//
// Memory: P is never kept. The CPU forward computes S for a tile of query rows over all keys (tile
// rows x Nk <= kTileElements values per buffer); backward recomputes it per tile of query rows and
// chunk of keys, P from the saved statistics. Extra memory grows linearly in the sequence length.
#include "attention/attention.h"
#include "attention/math.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace lxt_ext {

namespace {

// Values of one score tile on the CPU (1 MiB in float32): large enough for efficient GEMMs, small
// enough to stay in cache-sized chunks.
constexpr int64_t kTileElements = int64_t{1} << 18;

// A (.., tokens, D) operand the BLAS can read in place: unit stride along D, rows not overlapping.
at::Tensor gemm_operand(const at::Tensor& t, at::ScalarType acc) {
  at::Tensor c = t.to(acc);
  if (c.stride(-1) != 1 || c.stride(-2) < c.size(-1)) c = c.contiguous();
  return c;
}

// Query rows per CPU tile: the score tile covers every key, so rows shrink as Nk grows.
int64_t tile_rows(int64_t nq, int64_t nk) {
  return std::max<int64_t>(1, std::min<int64_t>(nq, std::max<int64_t>(16, kTileElements / std::max<int64_t>(nk, 1))));
}

// Runs body(item, scratch) for items [0, items), on every intra-op thread when `parallel` (each
// with its own scratch = init()), else on this thread. Threads take items one at a time from a
// shared counter rather than a fixed share each: when the cores are shared with other processes, a
// descheduled thread then does not hold back half of the work.
template <typename Init, typename Body>
void for_each_item(int64_t items, bool parallel, const Init& init, const Body& body) {
  std::atomic<int64_t> next{0};
  // The body calls ATen ops: intra-op threads run them under this thread's dispatcher state (below
  // autograd, inside the op), not their own defaults.
  const at::ThreadLocalState state;
  const auto worker = [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard guard(state);
    auto scratch = init();
    for (int64_t item = next++; item < items; item = next++) body(item, scratch);
  };
  if (parallel && items > 1) {
    at::parallel_for(0, std::min<int64_t>(items, at::get_num_threads()), 1, worker);
  } else {
    worker(0, 1);
  }
}

struct CpuAttention {
  Shapes s;
  at::Tensor q, k, v, mask;  // q, k, v in the accumulation dtype; mask as expand_mask returns it
  double scale;
  bool causal;
  int64_t rows;  // query rows per tile

  int64_t tiles() const { return (s.Nq + rows - 1) / rows; }
  // Keys a tile starting at query row i0 with tq rows can see.
  int64_t keys(int64_t i0, int64_t tq) const { return causal ? std::min(s.Nk, i0 + tq) : s.Nk; }

  // S = scale Q_t K^T + M for rows [i0, i0 + tq) of head (b, h) over keys [j0, j0 + nk), masked
  // entries -inf.
  template <typename acc_t>
  void scores(at::Tensor& S, int64_t b, int64_t h, int64_t i0, int64_t tq, int64_t j0, int64_t nk) const {
    const at::Tensor qt = q[b][h].narrow(0, i0, tq);
    const at::Tensor kt = k[b][h / s.group()].narrow(0, j0, nk).t();
    const bool additive = mask.defined() && mask.scalar_type() != at::kBool;
    if (additive) {
      at::addmm_out(S, mask[b][h].narrow(0, i0, tq).narrow(1, j0, nk).to(S.scalar_type()), qt, kt, 1, scale);
    } else {
      at::addmm_out(S, S, qt, kt, 0, scale);  // beta = 0: S's old values are ignored, NaN included
    }
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    acc_t* out = S.data_ptr<acc_t>();
    if (mask.defined() && !additive) {
      const bool* m = mask.data_ptr<bool>();
      const int64_t si = mask.stride(2), sj = mask.stride(3);
      const int64_t base = b * mask.stride(0) + h * mask.stride(1) + j0 * sj;
      for (int64_t r = 0; r < tq; ++r) {
        const bool* row = m + base + (i0 + r) * si;
        acc_t* srow = out + r * nk;
        for (int64_t j = 0; j < nk; ++j) {
          if (!row[j * sj]) srow[j] = neg_inf;
        }
      }
    }
    if (causal) {
      for (int64_t r = 0; r < tq; ++r) {
        const int64_t first_hidden = std::max<int64_t>(i0 + r + 1 - j0, 0);
        if (first_hidden < nk) std::fill(out + r * nk + first_hidden, out + (r + 1) * nk, neg_inf);
      }
    }
  }
};

template <typename acc_t>
void forward_cpu_kernel(const CpuAttention& a, at::Tensor& out, at::Tensor& stats) {
  const int64_t tiles = a.tiles();
  const int64_t items = a.s.B * a.s.Hq * tiles;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const auto scratch = [&] {
    return std::make_pair(at::empty({a.rows * a.s.Nk}, a.q.options()), at::empty({a.rows, 1}, a.q.options()));
  };
  for_each_item(items, true, scratch, [&](int64_t item, std::pair<at::Tensor, at::Tensor>& bufs) {
    at::Tensor& buffer = bufs.first;
    at::Tensor& shift = bufs.second;
    const int64_t b = item / (a.s.Hq * tiles), h = item / tiles % a.s.Hq, i0 = item % tiles * a.rows;
    const int64_t tq = std::min(a.rows, a.s.Nq - i0), nk = a.keys(i0, tq);
    at::Tensor o = out[b][h].narrow(0, i0, tq);
    acc_t* st = stats[b][h].data_ptr<acc_t>() + 2 * i0;
    if (nk == 0) {
      o.zero_();
      for (int64_t r = 0; r < tq; ++r) st[2 * r] = neg_inf, st[2 * r + 1] = 0;
      return;
    }
    at::Tensor S = buffer.narrow(0, 0, tq * nk).view({tq, nk});
    a.scores<acc_t>(S, b, h, i0, tq, 0, nk);
    const at::Tensor m = S.amax(1);
    const acc_t* mp = m.data_ptr<acc_t>();
    acc_t* sh = shift.data_ptr<acc_t>();
    // A row with no visible key has m = -inf; shifting it by 0 keeps its exp at exactly 0.
    for (int64_t r = 0; r < tq; ++r) sh[r] = mp[r] == neg_inf ? acc_t(0) : mp[r];
    S.sub_(shift.narrow(0, 0, tq)).exp_();
    const at::Tensor l = S.sum(1);
    at::mm_out(o, S, a.v[b][h / a.s.group()].narrow(0, 0, nk));
    const acc_t* lp = l.data_ptr<acc_t>();
    for (int64_t r = 0; r < tq; ++r) {
      sh[r] = lp[r] > 0 ? acc_t(1) / lp[r] : acc_t(0);
      st[2 * r] = mp[r];
      st[2 * r + 1] = lp[r] > 0 ? std::log(lp[r]) : acc_t(0);
    }
    o.mul_(shift.narrow(0, 0, tq));
  });
}

// Key chunks per (batch, key/value head) in backward: enough work items to keep every thread busy
// (and to balance when a thread is descheduled), at most kMaxKeyChunks partial dQ sums (each the
// size of Q), chunks of at least kMinChunkKeys keys.
constexpr int64_t kMaxKeyChunks = 8;
constexpr int64_t kMinChunkKeys = 128;

int64_t key_chunks(const Shapes& s) {
  const int64_t heads = std::max<int64_t>(s.B * s.Hkv, 1);
  const int64_t wanted = (4 * at::get_num_threads() + heads - 1) / heads;
  const int64_t most = std::max<int64_t>((s.Nk + kMinChunkKeys - 1) / kMinChunkKeys, 1);
  return std::min({wanted, most, kMaxKeyChunks});
}

// Backward work item (batch, key/value head, key chunk) owns its rows of dK and dV, so their
// accumulation over query tiles and over the heads of a group needs no synchronisation; its dQ
// contribution goes to the chunk's own partial sum. P is rebuilt from the saved statistics, so a
// tile needs only its own keys.
template <typename acc_t>
void backward_cpu_kernel(const CpuAttention& a, const at::Tensor& dout, const at::Tensor& stats,
                         const at::Tensor& delta, bool cp, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t G = a.s.group(), chunks = key_chunks(a.s);
  const int64_t chunk_keys = (a.s.Nk + chunks - 1) / chunks;
  const int64_t rows = tile_rows(a.s.Nq, chunk_keys), tiles = (a.s.Nq + rows - 1) / rows;
  const double dv_scale = cp ? 1.0 : kAttnLRPValueFactor, dqk_scale = a.scale * kAttnLRPQueryKeyFactor;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  // dQ partial sums, one per key chunk (dq itself when there is one chunk).
  at::Tensor dq_parts = cp || chunks == 1 ? dq : at::zeros({chunks, a.s.B, a.s.Hq, a.s.Nq, a.s.D}, dq.options());
  const auto scratch = [&] {
    return std::array<at::Tensor, 3>{at::empty({(cp ? 1 : 2) * rows * chunk_keys}, a.q.options()),
                                     at::empty({rows, 1}, a.q.options()), at::empty({rows, 1}, a.q.options())};
  };
  const int64_t items = a.s.B * a.s.Hkv * chunks;
  // With fewer items than threads, run them one by one and let the GEMMs and element-wise ops
  // use the threads instead.
  for_each_item(items, items >= at::get_num_threads(), scratch, [&](int64_t item, std::array<at::Tensor, 3>& bufs) {
    at::Tensor &buffer = bufs[0], &shift = bufs[1], &inv_l = bufs[2];
    const int64_t b = item / (a.s.Hkv * chunks), kv = item / chunks % a.s.Hkv, c = item % chunks;
    const int64_t j0 = c * chunk_keys, j1 = std::min(a.s.Nk, j0 + chunk_keys);
    if (j0 >= j1) return;
    const at::Tensor kc = a.k[b][kv].narrow(0, j0, j1 - j0), vc = a.v[b][kv].narrow(0, j0, j1 - j0);
    at::Tensor dkc = cp ? at::Tensor() : dk[b][kv].narrow(0, j0, j1 - j0), dvc = dv[b][kv].narrow(0, j0, j1 - j0);
    at::Tensor dq_part = cp ? at::Tensor() : chunks == 1 ? dq_parts : dq_parts[c];
    for (int64_t h = kv * G; h < (kv + 1) * G; ++h) {
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t i0 = t * rows, tq = std::min(rows, a.s.Nq - i0);
        const int64_t nk = std::min(j1, a.keys(i0, tq)) - j0;  // causal: a tile may see none of the chunk
        if (nk <= 0) continue;
        at::Tensor P = buffer.narrow(0, 0, tq * nk).view({tq, nk});
        a.scores<acc_t>(P, b, h, i0, tq, j0, nk);
        const acc_t* st = stats[b][h].data_ptr<acc_t>() + 2 * i0;
        acc_t* sh = shift.data_ptr<acc_t>();
        acc_t* il = inv_l.data_ptr<acc_t>();
        // P = exp(S - m) / l; rows without a visible key (m = -inf) shift by +inf to P = 0.
        for (int64_t r = 0; r < tq; ++r) {
          sh[r] = st[2 * r] == -inf ? inf : st[2 * r];
          il[r] = std::exp(-st[2 * r + 1]);
        }
        P.sub_(shift.narrow(0, 0, tq)).exp_().mul_(inv_l.narrow(0, 0, tq));
        const at::Tensor go = dout[b][h].narrow(0, i0, tq);
        dvc.narrow(0, 0, nk).addmm_(P.t(), go, 1, dv_scale);
        if (cp) continue;
        at::Tensor dS = buffer.narrow(0, tq * nk, tq * nk).view({tq, nk});
        at::mm_out(dS, go, vc.narrow(0, 0, nk).t());
        dS.sub_(delta[b][h].narrow(0, i0, tq).unsqueeze(1)).mul_(P);
        dq_part[b][h].narrow(0, i0, tq).addmm_(dS, kc.narrow(0, 0, nk), 1, dqk_scale);
        dkc.narrow(0, 0, nk).addmm_(dS.t(), a.q[b][h].narrow(0, i0, tq), 1, dqk_scale);
      }
    }
  });
  if (!cp && chunks > 1) dq.copy_(dq_parts.sum(0));
}

CpuAttention make_cpu(const Shapes& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& mask, double scale, bool is_causal) {
  const auto acc = acc_type(q);
  return CpuAttention{s, gemm_operand(q, acc), gemm_operand(k, acc), gemm_operand(v, acc), mask, scale, is_causal,
                      tile_rows(s.Nq, s.Nk)};
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const c10::optional<at::Tensor>& attn_mask,
                                                         double scale, bool is_causal) {
  const auto [s, mask] = check_forward(q, k, v, attn_mask);
  const CpuAttention a = make_cpu(s, q, k, v, mask, scale, is_causal);
  at::Tensor out = at::empty({s.B, s.Hq, s.Nq, s.D}, a.q.options());
  at::Tensor stats = at::empty({s.B, s.Hq, s.Nq, 2}, a.q.options());
  AT_DISPATCH_FLOATING_TYPES(a.q.scalar_type(), "lxt_ext::attention_forward", [&] {
    forward_cpu_kernel<scalar_t>(a, out, stats);
  });
  return {out.to(q.scalar_type()), stats};
}

std::vector<at::Tensor> attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const c10::optional<at::Tensor>& attn_mask,
                                               const at::Tensor& out, const at::Tensor& stats, double scale,
                                               bool is_causal, int64_t mode) {
  const auto [s, mask] = check_backward(grad_out, q, k, v, attn_mask, out, stats, mode);
  const bool cp = mode == kCP;
  const CpuAttention a = make_cpu(s, q, k, v, mask, scale, is_causal);
  const auto acc = a.q.scalar_type();
  const at::Tensor dout = gemm_operand(grad_out, acc);
  // rowsum(P * dP) = dO . O per query row (P's rows sum to one, or are zero where nothing is seen).
  const at::Tensor delta = cp ? at::Tensor() : (dout * out.to(acc)).sum(-1);
  at::Tensor dq = cp ? at::Tensor() : at::zeros({s.B, s.Hq, s.Nq, s.D}, a.q.options());
  at::Tensor dk = cp ? at::Tensor() : at::zeros({s.B, s.Hkv, s.Nk, s.D}, a.q.options());
  at::Tensor dv = at::zeros({s.B, s.Hkv, s.Nk, s.D}, a.q.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "lxt_ext::attention_backward", [&] {
    backward_cpu_kernel<scalar_t>(a, dout, stats, delta, cp, dq, dk, dv);
  });
  if (cp) return {dv.to(q.scalar_type())};
  return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(lxt_ext, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace lxt_ext
