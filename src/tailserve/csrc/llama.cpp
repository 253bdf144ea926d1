// The fused decoder step (llama.h's Llama::step) and the thread team it runs on: the heaviest code
// of the module (every linear kind with each of the step's epilogues, the pair attention), compiled
// apart from the bindings so that the two compile on two cores at once.
#include "llama.h"

#include <algorithm>
#include <chrono>

#include "team.h"

namespace tailserve {

Team& Team::instance() {
  static Team team;
  return team;
}

// From this many rows a linear's input is quantized by all threads, each a share of the rows, then a
// barrier; below it every thread quantizes all rows itself, which is cheaper than the barrier.
constexpr int64_t kSharedInputRows = 16;

// y = x / rms(x) · w, rounded to bf16 (the next linear's input).
inline void rms_norm_row(const float* x, const float* w, int64_t n, float eps, uint16_t* y) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = bf16_bits(x[i] * r * w[i]);
}

// Each of `heads` vectors of D scaled to unit RMS, times w, in place (fp32; the per-head q/k norm).
inline void rms_norm_heads(float* v, int64_t heads, int64_t D, const float* w, float eps) {
  for (int64_t h = 0; h < heads; ++h, v += D) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; ++i) ss += v[i] * v[i];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) v[i] = v[i] * r * w[i];
  }
}

// x += a / rms(a) · w (fp32): a sublayer's output normalised into the residual stream (Gemma 3).
inline void rms_norm_add(const float* a, const float* w, int64_t n, float eps, float* x) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += a[i] * a[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] += a[i] * r * w[i];
}

// Rotates each head's halves by the position's angles: x·cos + rotate_half(x)·sin.
inline void rope_heads(float* v, int64_t heads, int64_t D, const float* c, const float* s) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h, v += D)
#pragma omp simd
    for (int64_t d = 0; d < half; ++d) {
      const float a = v[d], b = v[d + half];
      v[d] = a * c[d] - b * s[d];
      v[d + half] = b * c[d + half] + a * s[d + half];
    }
}

void Llama::step(const Batch& batch, const Caches& caches, int64_t depth, float* out) const {
  const int64_t L = static_cast<int64_t>(layers_.size()), H = H_, Hkv = Hkv_, D = D_, Hd = hidden_, I = inter_;
  TS_CHECK(L > 0 && caches.layers == L, "one K and one V cache per layer");
  TS_CHECK(depth >= 1 && depth <= L, "depth must be in [1, layers]");
  const Linear& head = depth < L && draft_head_ ? *draft_head_ : head_;
  const int64_t QD = H * D, KVD = Hkv * D, QKV = QD + 2 * KVD, V = head.pw.N, W = window_;
  const bool split = batch.sliding_tables != nullptr;  // the sliding layers' own pool and table
  TS_CHECK(!split || W > 0, "a split pool needs set_family's window");
  int64_t num_blocks = -1, num_blocks_s = -1;  // blocks in the pool each table addresses (the least of its layers')
  for (int64_t l = 0; l < L; ++l) {
    TS_CHECK(caches.k[l] && caches.v[l] && caches.blocks[l] > 0, "layer ", l, ": no KV pool");
    int64_t& n = split && layers_[l].opt.sliding ? num_blocks_s : num_blocks;
    n = n < 0 ? caches.blocks[l] : std::min(n, caches.blocks[l]);
  }
  const int64_t S = batch.S, nblk = batch.nblk, bs = batch.block_size;
  const int64_t nblk_s = split ? batch.nblk_s : nblk;
  const int64_t max_pos = positions_, vocab_in = vocab_in_;
  TS_CHECK(S >= 0 && nblk >= 0 && nblk_s >= 0 && batch.T >= 0 && batch.R >= 0, "negative sizes");
  TS_CHECK(bs > 0 && bs % 16 == 0, "the fused step needs a block size that is a multiple of 16");
  const int64_t* sq = batch.seqs;
  const int64_t* tb = batch.tables;
  const int64_t* tbs = split ? batch.sliding_tables : tb;
  const int64_t* id = batch.ids;
  int64_t T = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t start = sq[2 * s], count = sq[2 * s + 1], end = start + count;
    TS_CHECK(start >= 0 && count > 0 && end <= max_pos && (end + bs - 1) / bs <= std::min(nblk, nblk_s),
             "sequence ", s, " out of range");
    for (int64_t j = 0; j < (end + bs - 1) / bs; ++j) {
      TS_CHECK(num_blocks < 0 || (tb[s * nblk + j] >= 0 && tb[s * nblk + j] < num_blocks), "block id out of range");
      TS_CHECK(num_blocks_s < 0 || (tbs[s * nblk_s + j] >= 0 && tbs[s * nblk_s + j] < num_blocks_s),
               "sliding block id out of range");
    }
    T += count;
  }
  TS_CHECK(batch.T == T, "ids must hold every sequence's tokens");
  for (int64_t t = 0; t < T; ++t) TS_CHECK(id[t] >= 0 && id[t] < vocab_in, "token id out of range");
  const int64_t R = batch.R;
  const int64_t* sr = batch.sample_rows;
  for (int64_t r = 0; r < R; ++r) TS_CHECK(sr[r] >= 0 && sr[r] < T, "sample row out of range");

  std::vector<int64_t> pos(T), row_seq(T), blk_base(T), blk_base_s(split ? T : 0), lens(T), starts(W > 0 ? T : 0);
  for (int64_t s = 0, t = 0; s < S; ++s)
    for (int64_t i = 0; i < sq[2 * s + 1]; ++i, ++t) {
      const int64_t p = sq[2 * s] + i;
      pos[t] = p;
      row_seq[t] = s;
      blk_base[t] = tb[s * nblk + p / bs] * Hkv * bs * D;
      if (split) blk_base_s[t] = tbs[s * nblk_s + p / bs] * Hkv * bs * D;
      lens[t] = p + 1;
      if (W > 0) starts[t] = std::max<int64_t>(0, p + 1 - W);  // (p − W, p]: transformers' window
    }
  bool sandwich = false;  // any sublayer output norm: the O and down linears store, a norm adds
  for (const Layer& ly : layers_) sandwich = sandwich || ly.opt.attn_out_norm || ly.opt.mlp_out_norm;
  std::vector<float> x(T * Hd), qkv(T * QKV), sublayer(sandwich ? T * Hd : 0);
  std::vector<uint16_t> xn(std::max(T, R) * Hd), attn(T * QD), act(T * I);
  const int nth = threads_;
  PairAttentionArgs aa{H,       Hkv,     D,  bs, qkv.data(), QKV, nullptr, nullptr, tb, nblk, row_seq.data(),
                       lens.data(), attn_scale_, attn.data(), QD};
  const BF16* emb = embed_;
  const float *cs = cos_, *sn = sin_, *cs_local = cos_local_, *sn_local = sin_local_;

  // The last layer's attention and MLP matter only for the rows whose logits are wanted (the other
  // rows' hidden states are dropped, their K and V already written): they run on those rows alone.
  const bool trim = R < T;
  std::vector<int64_t> seq_s(R), lens_s(R), starts_s(W > 0 ? R : 0);
  std::vector<float> x_s(trim ? R * Hd : 0), qkv_s(trim ? R * QKV : 0);
  for (int64_t r = 0; r < R; ++r) {
    seq_s[r] = row_seq[sr[r]];
    lens_s[r] = lens[sr[r]];
    if (W > 0) starts_s[r] = starts[sr[r]];
  }
  PairAttentionArgs aa_s = aa;
  aa_s.q = qkv_s.data();
  aa_s.row_seq = seq_s.data();
  aa_s.lens = lens_s.data();

  InputScratch shared;  // the linears' inputs when the threads prepare them together
  for (const Layer& ly : layers_)
    for (const Linear* l : {&ly.qkv, &ly.o, &ly.gate_up, &ly.down}) size_scratch(l->pw, T, shared);
  size_scratch(head.pw, R, shared);
  Team& team = Team::instance();
  team.run(nth, [&](int tid, int nt) {
    int64_t b, e;
    using clock = std::chrono::steady_clock;
    auto mark = clock::now();
    // After a barrier: thread 0 charges the time since the last one to `phase` (its wall time).
    auto lap = [&](Phase phase) {
      if (tid == 0) {
        const auto now = clock::now();
        phase_seconds_[phase] += std::chrono::duration<double>(now - mark).count();
        mark = now;
      }
    };
    InputScratch scratch;  // a few rows: each thread prepares a linear's whole input itself, no barrier
    auto linear = [&](const Linear& l, const uint16_t* x, int64_t ld, int64_t M, const auto& epi) {
      Input in;
      if (M >= kSharedInputRows && nt > 1) {  // many rows: the threads share the work, one barrier more
        in = input_view(l.pw, x, ld, shared);
        thread_range(M, tid, nt, b, e);
        prepare_rows(l.pw, in, b, e);
        team.barrier(nt);
      } else {
        in = prepare_input(l.pw, x, ld, M, scratch);
      }
      thread_range(l.pw.blocks(), tid, nt, b, e);
      linear_blocks(l.pw, in, M, b, e, epi);
    };
    auto rows = [&](int64_t n) { thread_range(n, tid, nt, b, e); };

    rows(T);
    for (int64_t t = b; t < e; ++t)
      for (int64_t i = 0; i < Hd; ++i) x[t * Hd + i] = load_f(emb[id[t] * Hd + i]) * embed_scale_;
    team.barrier(nt);
    lap(kEmbed);
    for (int64_t l = 0; l < depth; ++l) {
      const Layer& ly = layers_[l];
      const LayerOptions& op = ly.opt;
      uint16_t* kc = caches.k[l];
      uint16_t* vc = caches.v[l];
      const bool own_pool = split && op.sliding;  // this layer's KV is in the sliding layers' pool
      const int64_t* base = own_pool ? blk_base_s.data() : blk_base.data();
      rows(T);
      for (int64_t t = b; t < e; ++t)
        rms_norm_row(&x[t * Hd], ly.in_norm, Hd, eps_, &xn[t * Hd]);
      team.barrier(nt);
      lap(kNorm);
      linear(ly.qkv, xn.data(), Hd, T, StoreF32{qkv.data(), QKV, QKV});
      team.barrier(nt);
      lap(kQkv);
      rows(T);
      for (int64_t t = b; t < e; ++t) {
        float* r = &qkv[t * QKV];
        if (op.qkv_bias)
          for (int64_t i = 0; i < QKV; ++i) r[i] += op.qkv_bias[i];
        if (op.q_norm) {
          rms_norm_heads(r, H, D, op.q_norm, eps_);
          rms_norm_heads(r + QD, Hkv, D, op.k_norm, eps_);
        }
        const float* c = (op.sliding ? cs_local : cs) + pos[t] * D;
        rope_heads(r, H + Hkv, D, c, (op.sliding ? sn_local : sn) + pos[t] * D);  // q heads, then k heads
        const int64_t o = pos[t] % bs;
        for (int64_t hh = 0; hh < Hkv; ++hh) {
          uint16_t* kd = kc + base[t] + hh * bs * D;
          uint16_t* vd = vc + base[t] + hh * bs * D;
          const float* kr = r + QD + hh * D;
          const float* vr = r + QD + KVD + hh * D;
          for (int64_t d = 0; d < D; ++d) {
            kd[k_index(o, d, bs)] = bf16_bits(kr[d]);
            vd[v_index(o, d, D)] = bf16_bits(vr[d]);
          }
        }
      }
      team.barrier(nt);
      lap(kRope);
      int64_t M = T;  // rows from here on: all, or in the last layer only the sampled ones
      float* xr = x.data();
      PairAttentionArgs la = aa;
      if (trim && l == depth - 1) {
        rows(R);
        for (int64_t r = b; r < e; ++r) {
          std::copy_n(&qkv[sr[r] * QKV], QKV, &qkv_s[r * QKV]);
          std::copy_n(&x[sr[r] * Hd], Hd, &x_s[r * Hd]);
        }
        team.barrier(nt);
        M = R;
        xr = x_s.data();
        la = aa_s;
      }
      la.kc = kc;
      la.vc = vc;
      if (own_pool) {
        la.table = tbs;
        la.table_stride = nblk_s;
      }
      if (op.sliding) la.starts = M == T ? starts.data() : starts_s.data();
      thread_range(M * Hkv, tid, nt, b, e);
      pair_attention_items(la, b, e);
      team.barrier(nt);
      lap(kAttention);
      if (op.attn_out_norm) {
        linear(ly.o, attn.data(), QD, M, StoreF32{sublayer.data(), Hd, Hd});
        team.barrier(nt);
        rows(M);
        for (int64_t t = b; t < e; ++t) rms_norm_add(&sublayer[t * Hd], op.attn_out_norm, Hd, eps_, &xr[t * Hd]);
      } else {
        linear(ly.o, attn.data(), QD, M, AddF32{xr, Hd, Hd});
      }
      team.barrier(nt);
      lap(kO);
      rows(M);
      for (int64_t t = b; t < e; ++t)
        rms_norm_row(&xr[t * Hd], ly.post_norm, Hd, eps_, &xn[t * Hd]);
      team.barrier(nt);
      lap(kNorm);
      if (gelu_) linear(ly.gate_up, xn.data(), Hd, M, GeluGlu{act.data(), I, I});
      else linear(ly.gate_up, xn.data(), Hd, M, SwiGlu{act.data(), I, I});
      team.barrier(nt);
      lap(kGateUp);
      if (op.mlp_out_norm) {
        linear(ly.down, act.data(), I, M, StoreF32{sublayer.data(), Hd, Hd});
        team.barrier(nt);
        rows(M);
        for (int64_t t = b; t < e; ++t) rms_norm_add(&sublayer[t * Hd], op.mlp_out_norm, Hd, eps_, &xr[t * Hd]);
      } else {
        linear(ly.down, act.data(), I, M, AddF32{xr, Hd, Hd});
      }
      team.barrier(nt);
      lap(kDown);
    }
    rows(R);
    for (int64_t r = b; r < e; ++r) {
      const float* xf = trim ? &x_s[r * Hd] : &x[sr[r] * Hd];
      rms_norm_row(xf, norm_, Hd, eps_, &xn[r * Hd]);
    }
    team.barrier(nt);
    lap(kNorm);
    if (final_cap_ > 0.f) linear(head, xn.data(), Hd, R, CappedF32{out, V, V, final_cap_});
    else linear(head, xn.data(), Hd, R, StoreF32{out, V, V});
    team.barrier(nt);
    lap(kHead);  // (the barrier only so that the head's time is the slowest thread's)
  });
}

}  // namespace tailserve
