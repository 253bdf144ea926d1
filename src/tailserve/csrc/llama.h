// The whole Llama decoder step in one call: embedding, every layer, the final norm and the head, over
// a flat batch of decode rows and prefill chunks. One run of the thread team (team.h) spans the step;
// its phases (norm, QKV, RoPE + KV write, attention, O + residual, norm, gate/up + SwiGLU, down +
// residual) are split statically between threads and separated by barriers. Per decode step that
// replaces ~600 PyTorch op dispatches and their allocations with ~240 barriers, and the GIL is
// released throughout.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "attention.h"
#include "linear.h"
#include "team.h"

namespace {

// A linear's packed weight as layers/linear.py built it; the tensors keep the memory alive.
struct Linear {
  PackedWeight pw;
  torch::Tensor w, s;

  Linear(int64_t kind, torch::Tensor w_, torch::Tensor s_, int64_t n, int64_t k, int64_t group) : w(w_), s(s_) {
    TORCH_CHECK(kind >= kBf16 && kind <= kU8, "unknown linear kind ", kind);
    TORCH_CHECK(w.is_contiguous() && k % 2 == 0 && n > 0, "bad packed weight or odd in_features");
    pw = PackedWeight{static_cast<int>(kind), static_cast<const uint8_t*>(w.data_ptr()), nullptr, nullptr, n, k, group};
    TORCH_CHECK(w.nbytes() == static_cast<size_t>(pw.blocks() * (k / 2) * pw.bytes_per_pair()),
                "packed weight size mismatch");
    if (kind == kInt8) {
      TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.numel() == pw.blocks() * kBlock, "bad scale");
      pw.scale = s.data_ptr<float>();
    } else if (pw.grouped()) {
      TORCH_CHECK(group > 0 && group % 4 == 0 && k % group == 0, "in_features must be a multiple of the group (4n)");
      TORCH_CHECK(s.scalar_type() == at::kHalf && s.is_contiguous() && s.numel() == pw.blocks() * (k / group) * 64,
                  "bad group scales");
      pw.gscale = reinterpret_cast<const uint16_t*>(s.data_ptr());
    }
  }
};

// What a layer of another family adds to Llama's (set_layer_options); null pointers: not there.
struct LayerOptions {
  torch::Tensor keep[5];                 // the tensors the pointers below read
  const float* qkv_bias = nullptr;       // [q + 2·kv dims], added after the QKV linear (Qwen2)
  const float* q_norm = nullptr;         // [head_dim]: RMSNorm over each q head before RoPE (Qwen3, Gemma 3)
  const float* k_norm = nullptr;         // [head_dim]: the same over each k head
  const float* attn_out_norm = nullptr;  // [hidden]: the attention's output normalised before the residual add
  const float* mlp_out_norm = nullptr;   // [hidden]: the MLP's output normalised before the residual add
  bool sliding = false;                  // attends to the last `window` tokens only, with the local RoPE tables
};

struct Layer {
  torch::Tensor in_norm, post_norm;  // fp32 [hidden]; post_norm: the norm before the MLP
  Linear qkv, o, gate_up, down;      // gate_up interleaved in 16-row halves for the SwiGlu epilogue
  LayerOptions opt{};
};

using BF16 = c10::BFloat16;

// From this many rows a linear's input is quantized by all threads, each a share of the rows, then a
// barrier; below it every thread quantizes all rows itself, which is cheaper than the barrier.
constexpr int64_t kSharedInputRows = 16;

inline uint16_t bf16_bits(float f) { return BF16(f).x; }

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

class Llama {
 public:
  enum Phase { kEmbed, kNorm, kQkv, kRope, kAttention, kO, kGateUp, kDown, kHead, kPhases };

  Llama(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, torch::Tensor embed, torch::Tensor norm,
        Linear head, torch::Tensor cos, torch::Tensor sin)
      : H_(heads), Hkv_(kv_heads), D_(head_dim), eps_(static_cast<float>(eps)), embed_(embed), norm_(norm),
        head_(std::move(head)), cos_(cos), sin_(sin), cos_local_(cos), sin_local_(sin),
        attn_scale_(1.f / std::sqrt(static_cast<float>(head_dim))) {
    TORCH_CHECK(embed.scalar_type() == at::kBFloat16 && embed.is_contiguous() && embed.dim() == 2, "embed: bf16 [V, h]");
    hidden_ = embed.size(1);
    check_f32(norm, hidden_, "final norm");
    TORCH_CHECK(head_.pw.K == hidden_, "head in_features != hidden size");
    TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= kMaxPairGroup, "at most 8 query heads per KV head");
    TORCH_CHECK(head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256,
                "head_dim 16, 32, 64, 128 or 256");
    check_rope(cos, sin);
  }

  // The options of the families beyond Llama (models/fused.py sets them; a Llama model never calls
  // this): embeddings × embed_scale, attention scores × attn_scale, the gate's activation (0 SiLU, 1
  // GELU-tanh), final logits soft-capped at final_cap (0: not), the sliding layers' window (tokens,
  // itself included) and RoPE tables.
  void set_family(double embed_scale, double attn_scale, int64_t activation, double final_cap, int64_t window,
                  torch::Tensor cos_local, torch::Tensor sin_local) {
    TORCH_CHECK(activation == 0 || activation == 1, "activation: 0 SiLU, 1 GELU-tanh");
    TORCH_CHECK(final_cap >= 0 && window >= 0 && attn_scale > 0, "bad family options");
    check_rope(cos_local, sin_local);
    TORCH_CHECK(cos_local.size(0) == cos_.size(0), "local rope tables: as many positions as the others");
    embed_scale_ = static_cast<float>(embed_scale);
    attn_scale_ = static_cast<float>(attn_scale);
    gelu_ = activation == 1;
    final_cap_ = static_cast<float>(final_cap);
    window_ = window;
    cos_local_ = cos_local;
    sin_local_ = sin_local;
  }

  // Layer `l`'s options (after add_layer); an empty tensor is an option the layer does not have.
  void set_layer_options(int64_t l, torch::Tensor qkv_bias, torch::Tensor q_norm, torch::Tensor k_norm,
                         torch::Tensor attn_out_norm, torch::Tensor mlp_out_norm, bool sliding) {
    TORCH_CHECK(l >= 0 && l < static_cast<int64_t>(layers_.size()), "no layer ", l);
    TORCH_CHECK(!sliding || window_ > 0, "a sliding layer needs set_family's window first");
    LayerOptions o;
    const int64_t qkv_dims = (H_ + 2 * Hkv_) * D_;
    auto opt = [&](torch::Tensor t, int64_t n, const char* what, int slot) -> const float* {
      if (t.numel() == 0) return nullptr;
      check_f32(t, n, what);
      o.keep[slot] = t;
      return t.data_ptr<float>();
    };
    o.qkv_bias = opt(qkv_bias, qkv_dims, "qkv bias", 0);
    o.q_norm = opt(q_norm, D_, "q norm", 1);
    o.k_norm = opt(k_norm, D_, "k norm", 2);
    TORCH_CHECK((o.q_norm == nullptr) == (o.k_norm == nullptr), "q and k norms come together");
    o.attn_out_norm = opt(attn_out_norm, hidden_, "attention output norm", 3);
    o.mlp_out_norm = opt(mlp_out_norm, hidden_, "MLP output norm", 4);
    o.sliding = sliding;
    layers_[l].opt = std::move(o);
  }

  void add_layer(torch::Tensor in_norm, torch::Tensor post_norm, Linear qkv, Linear o, Linear gate_up, Linear down) {
    check_f32(in_norm, hidden_, "input norm");
    check_f32(post_norm, hidden_, "post-attention norm");
    const int64_t qd = H_ * D_, kvd = Hkv_ * D_, inter = gate_up.pw.N / 2;
    TORCH_CHECK(qkv.pw.K == hidden_ && qkv.pw.N == qd + 2 * kvd, "qkv shape");
    TORCH_CHECK(o.pw.K == qd && o.pw.N == hidden_, "o shape");
    TORCH_CHECK(gate_up.pw.K == hidden_ && gate_up.pw.N % kBlock == 0, "gate_up: intermediate size must be a multiple of 16");
    TORCH_CHECK(down.pw.K == inter && down.pw.N == hidden_, "down shape");
    inter_ = inter;
    layers_.push_back(Layer{in_norm, post_norm, std::move(qkv), std::move(o), std::move(gate_up), std::move(down)});
  }

  // seqs [S, 2] int64: per sequence (first position, tokens this step); its rows are consecutive in
  // ids. tables [S, max_blocks] int64 block ids. sample_rows: the rows whose logits are returned.
  // depth < number of layers: a draft pass through the first `depth` layers only, then the final norm and
  // the draft head (set_draft_head) if there is one; it writes those layers' KV like the full pass does.
  // Every layer's pool is addressed by `tables` (forward_split: the sliding layers' by a table of their own).
  torch::Tensor forward(torch::Tensor ids, torch::Tensor seqs, torch::Tensor tables, int64_t block_size,
                        torch::Tensor sample_rows, const std::vector<torch::Tensor>& k_caches,
                        const std::vector<torch::Tensor>& v_caches, int64_t depth) const {
    return step(ids, seqs, tables, tables, block_size, sample_rows, k_caches, v_caches, depth);
  }

  // forward with the sliding layers' KV in a pool of their own (engine/kv_pools.py), addressed by
  // sliding_tables [S, blocks]: a sequence's blocks behind every window are no longer in it, so only
  // the entries of blocks a window can reach need to name a live block (the others: any valid id).
  torch::Tensor forward_split(torch::Tensor ids, torch::Tensor seqs, torch::Tensor tables, torch::Tensor sliding_tables,
                              int64_t block_size, torch::Tensor sample_rows, const std::vector<torch::Tensor>& k_caches,
                              const std::vector<torch::Tensor>& v_caches, int64_t depth) const {
    TORCH_CHECK(window_ > 0, "a split pool needs set_family's window");
    return step(ids, seqs, tables, sliding_tables, block_size, sample_rows, k_caches, v_caches, depth);
  }

  // Threads that run a step (the caller and threads_ - 1 members of the team).
  void set_threads(int64_t n) {
    TORCH_CHECK(n >= 1 && n <= 1024, "threads must be in [1, 1024]");
    threads_ = static_cast<int>(n);
  }

  void set_draft_head(Linear head) {
    TORCH_CHECK(head.pw.K == hidden_ && head.pw.N == head_.pw.N, "draft head shape != head shape");
    draft_head_ = std::make_unique<Linear>(std::move(head));
  }

  // Wall seconds spent in each phase since the last call, then reset: where a step's time goes.
  std::map<std::string, double> take_phase_seconds() {
    static const char* names[kPhases] = {"embed", "norm", "qkv", "rope_kv", "attention", "o", "gate_up", "down", "head"};
    std::map<std::string, double> out;
    for (int i = 0; i < kPhases; ++i) {
      out[names[i]] = phase_seconds_[i];
      phase_seconds_[i] = 0.0;
    }
    return out;
  }

 private:
  torch::Tensor step(torch::Tensor ids, torch::Tensor seqs, torch::Tensor tables, torch::Tensor sliding_tables,
                     int64_t block_size, torch::Tensor sample_rows, const std::vector<torch::Tensor>& k_caches,
                     const std::vector<torch::Tensor>& v_caches, int64_t depth) const {
    const int64_t L = static_cast<int64_t>(layers_.size()), H = H_, Hkv = Hkv_, D = D_, Hd = hidden_, I = inter_;
    TORCH_CHECK(L > 0 && static_cast<int64_t>(k_caches.size()) == L && static_cast<int64_t>(v_caches.size()) == L,
                "one K and one V cache per layer");
    TORCH_CHECK(depth >= 1 && depth <= L, "depth must be in [1, layers]");
    const Linear& head = depth < L && draft_head_ ? *draft_head_ : head_;
    const int64_t QD = H * D, KVD = Hkv * D, QKV = QD + 2 * KVD, V = head.pw.N, W = window_;
    const bool split = !sliding_tables.is_same(tables);  // the sliding layers' own pool and table
    int64_t num_blocks = -1, num_blocks_s = -1;  // blocks in the pool each table addresses (the least of its layers')
    for (int64_t l = 0; l < L; ++l) {
      const auto& k = k_caches[l];
      const auto& v = v_caches[l];
      TORCH_CHECK(k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 && k.is_contiguous() &&
                      v.is_contiguous() && k.sizes() == v.sizes() && k.dim() == 4 && k.size(1) == Hkv &&
                      k.size(2) == block_size && k.size(3) == D,
                  "caches: bf16 [blocks, kv_heads, block_size, head_dim] (attention.h's pair layout)");
      int64_t& n = split && layers_[l].opt.sliding ? num_blocks_s : num_blocks;
      n = n < 0 ? k.size(0) : std::min(n, k.size(0));
    }
    for (const auto* t : {&ids, &seqs, &tables, &sample_rows})
      TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "index tensors must be contiguous int64");
    TORCH_CHECK(sliding_tables.scalar_type() == at::kLong && sliding_tables.is_contiguous(),
                "index tensors must be contiguous int64");
    TORCH_CHECK(seqs.dim() == 2 && seqs.size(1) == 2 && tables.dim() == 2 && tables.size(0) == seqs.size(0) &&
                    sliding_tables.dim() == 2 && sliding_tables.size(0) == seqs.size(0),
                "seqs [S, 2] and tables [S, blocks]");
    const int64_t S = seqs.size(0), nblk = tables.size(1), nblk_s = sliding_tables.size(1), bs = block_size;
    const int64_t max_pos = cos_.size(0), vocab_in = embed_.size(0);
    TORCH_CHECK(bs > 0 && bs % 16 == 0, "the fused step needs a block size that is a multiple of 16");
    const int64_t* sq = seqs.data_ptr<int64_t>();
    const int64_t* tb = tables.data_ptr<int64_t>();
    const int64_t* tbs = sliding_tables.data_ptr<int64_t>();
    const int64_t* id = ids.data_ptr<int64_t>();
    int64_t T = 0;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t start = sq[2 * s], count = sq[2 * s + 1], end = start + count;
      TORCH_CHECK(start >= 0 && count > 0 && end <= max_pos && (end + bs - 1) / bs <= std::min(nblk, nblk_s),
                  "sequence ", s, " out of range");
      for (int64_t j = 0; j < (end + bs - 1) / bs; ++j) {
        TORCH_CHECK(num_blocks < 0 || (tb[s * nblk + j] >= 0 && tb[s * nblk + j] < num_blocks), "block id out of range");
        TORCH_CHECK(num_blocks_s < 0 || (tbs[s * nblk_s + j] >= 0 && tbs[s * nblk_s + j] < num_blocks_s),
                    "sliding block id out of range");
      }
      T += count;
    }
    TORCH_CHECK(ids.numel() == T, "ids must hold every sequence's tokens");
    for (int64_t t = 0; t < T; ++t) TORCH_CHECK(id[t] >= 0 && id[t] < vocab_in, "token id out of range");
    const int64_t R = sample_rows.numel();
    const int64_t* sr = sample_rows.data_ptr<int64_t>();
    for (int64_t r = 0; r < R; ++r) TORCH_CHECK(sr[r] >= 0 && sr[r] < T, "sample row out of range");

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
    auto logits = torch::empty({R, V}, torch::kFloat);
    float* out = logits.data_ptr<float>();
    const int nth = threads_;
    PairAttentionArgs aa{H,       Hkv,     D,  bs, qkv.data(), QKV, nullptr, nullptr, tb, nblk, row_seq.data(),
                         lens.data(), attn_scale_, attn.data(), QD};
    const auto* emb = embed_.data_ptr<BF16>();
    const float* cs = cos_.data_ptr<float>();
    const float* sn = sin_.data_ptr<float>();
    const float* cs_local = cos_local_.data_ptr<float>();
    const float* sn_local = sin_local_.data_ptr<float>();

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
        auto* kc = reinterpret_cast<uint16_t*>(k_caches[l].data_ptr());
        auto* vc = reinterpret_cast<uint16_t*>(v_caches[l].data_ptr());
        const bool own_pool = split && op.sliding;  // this layer's KV is in the sliding layers' pool
        const int64_t* base = own_pool ? blk_base_s.data() : blk_base.data();
        rows(T);
        for (int64_t t = b; t < e; ++t)
          rms_norm_row(&x[t * Hd], ly.in_norm.data_ptr<float>(), Hd, eps_, &xn[t * Hd]);
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
          rms_norm_row(&xr[t * Hd], ly.post_norm.data_ptr<float>(), Hd, eps_, &xn[t * Hd]);
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
        rms_norm_row(xf, norm_.data_ptr<float>(), Hd, eps_, &xn[r * Hd]);
      }
      team.barrier(nt);
      lap(kNorm);
      if (final_cap_ > 0.f) linear(head, xn.data(), Hd, R, CappedF32{out, V, V, final_cap_});
      else linear(head, xn.data(), Hd, R, StoreF32{out, V, V});
      team.barrier(nt);
      lap(kHead);  // (the barrier only so that the head's time is the slowest thread's)
    });
    return logits;
  }

  static void check_f32(const torch::Tensor& t, int64_t n, const char* what) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, what, ": fp32 [", n, "]");
  }

  void check_rope(const torch::Tensor& cos, const torch::Tensor& sin) const {
    TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && cos.dim() == 2 && cos.size(1) == D_ &&
                    sin.sizes() == cos.sizes() && sin.is_contiguous() && sin.scalar_type() == at::kFloat,
                "rope tables: fp32 [positions, head_dim]");
  }

  int64_t H_, Hkv_, D_, hidden_ = 0, inter_ = 0;
  int threads_ = 1;
  float eps_;
  torch::Tensor embed_, norm_;
  Linear head_;
  std::unique_ptr<Linear> draft_head_;
  torch::Tensor cos_, sin_, cos_local_, sin_local_;
  float attn_scale_, embed_scale_ = 1.f, final_cap_ = 0.f;
  bool gelu_ = false;
  int64_t window_ = 0;
  std::vector<Layer> layers_;
  mutable double phase_seconds_[kPhases] = {};
};

}  // namespace
