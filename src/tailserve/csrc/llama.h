// The whole Llama decoder step in one call: embedding, every layer, the final norm and the head, over
// a flat batch of decode rows and prefill chunks. One run of the thread team (team.h) spans the step;
// its phases (norm, QKV, RoPE + KV write, attention, O + residual, norm, gate/up + SwiGLU, down +
// residual) are split statically between threads and separated by barriers. Per decode step that
// replaces ~600 PyTorch op dispatches and their allocations with ~240 barriers, and the GIL is
// released throughout. This header declares what the bindings (kernels.cpp) see; the step itself is
// compiled in llama.cpp, a translation unit of its own (layers/kernels.py builds the units in parallel).
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "attention.h"
#include "linear.h"

namespace tailserve {

// A linear's packed weight as layers/linear.py built it; the tensors keep the memory alive.
struct Linear {
  PackedWeight pw;
  at::Tensor w, s;

  Linear(int64_t kind, at::Tensor w_, at::Tensor s_, int64_t n, int64_t k, int64_t group) : w(w_), s(s_) {
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
  at::Tensor keep[5];                    // the tensors the pointers below read
  const float* qkv_bias = nullptr;       // [q + 2·kv dims], added after the QKV linear (Qwen2)
  const float* q_norm = nullptr;         // [head_dim]: RMSNorm over each q head before RoPE (Qwen3, Gemma 3)
  const float* k_norm = nullptr;         // [head_dim]: the same over each k head
  const float* attn_out_norm = nullptr;  // [hidden]: the attention's output normalised before the residual add
  const float* mlp_out_norm = nullptr;   // [hidden]: the MLP's output normalised before the residual add
  bool sliding = false;                  // attends to the last `window` tokens only, with the local RoPE tables
};

struct Layer {
  at::Tensor in_norm, post_norm;  // fp32 [hidden]; post_norm: the norm before the MLP
  Linear qkv, o, gate_up, down;   // gate_up interleaved in 16-row halves for the SwiGlu epilogue
  LayerOptions opt{};
};

class Llama {
 public:
  enum Phase { kEmbed, kNorm, kQkv, kRope, kAttention, kO, kGateUp, kDown, kHead, kPhases };

  Llama(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, at::Tensor embed, at::Tensor norm,
        Linear head, at::Tensor cos, at::Tensor sin)
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
                  at::Tensor cos_local, at::Tensor sin_local) {
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
  void set_layer_options(int64_t l, at::Tensor qkv_bias, at::Tensor q_norm, at::Tensor k_norm,
                         at::Tensor attn_out_norm, at::Tensor mlp_out_norm, bool sliding) {
    TORCH_CHECK(l >= 0 && l < static_cast<int64_t>(layers_.size()), "no layer ", l);
    TORCH_CHECK(!sliding || window_ > 0, "a sliding layer needs set_family's window first");
    LayerOptions o;
    const int64_t qkv_dims = (H_ + 2 * Hkv_) * D_;
    auto opt = [&](at::Tensor t, int64_t n, const char* what, int slot) -> const float* {
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

  void add_layer(at::Tensor in_norm, at::Tensor post_norm, Linear qkv, Linear o, Linear gate_up, Linear down) {
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
  at::Tensor forward(at::Tensor ids, at::Tensor seqs, at::Tensor tables, int64_t block_size,
                        at::Tensor sample_rows, const std::vector<at::Tensor>& k_caches,
                        const std::vector<at::Tensor>& v_caches, int64_t depth) const {
    return step(ids, seqs, tables, tables, block_size, sample_rows, k_caches, v_caches, depth);
  }

  // forward with the sliding layers' KV in a pool of their own (engine/kv_pools.py), addressed by
  // sliding_tables [S, blocks]: a sequence's blocks behind every window are no longer in it, so only
  // the entries of blocks a window can reach need to name a live block (the others: any valid id).
  at::Tensor forward_split(at::Tensor ids, at::Tensor seqs, at::Tensor tables, at::Tensor sliding_tables,
                              int64_t block_size, at::Tensor sample_rows, const std::vector<at::Tensor>& k_caches,
                              const std::vector<at::Tensor>& v_caches, int64_t depth) const {
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
  at::Tensor step(at::Tensor ids, at::Tensor seqs, at::Tensor tables, at::Tensor sliding_tables,
                  int64_t block_size, at::Tensor sample_rows, const std::vector<at::Tensor>& k_caches,
                  const std::vector<at::Tensor>& v_caches, int64_t depth) const;  // llama.cpp

  static void check_f32(const at::Tensor& t, int64_t n, const char* what) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, what, ": fp32 [", n, "]");
  }

  void check_rope(const at::Tensor& cos, const at::Tensor& sin) const {
    TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && cos.dim() == 2 && cos.size(1) == D_ &&
                    sin.sizes() == cos.sizes() && sin.is_contiguous() && sin.scalar_type() == at::kFloat,
                "rope tables: fp32 [positions, head_dim]");
  }

  int64_t H_, Hkv_, D_, hidden_ = 0, inter_ = 0;
  int threads_ = 1;
  float eps_;
  at::Tensor embed_, norm_;
  Linear head_;
  std::unique_ptr<Linear> draft_head_;
  at::Tensor cos_, sin_, cos_local_, sin_local_;
  float attn_scale_, embed_scale_ = 1.f, final_cap_ = 0.f;
  bool gelu_ = false;
  int64_t window_ = 0;
  std::vector<Layer> layers_;
  mutable double phase_seconds_[kPhases] = {};
};

}  // namespace tailserve
