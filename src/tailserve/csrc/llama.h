// The whole Llama decoder step in one call: embedding, every layer, the final norm and the head, over
// a flat batch of decode rows and prefill chunks. One run of the thread team (team.h) spans the step;
// its phases (norm, QKV, RoPE + KV write, attention, O + residual, norm, gate/up + SwiGLU, down +
// residual) are split statically between threads and separated by barriers. Per decode step that
// replaces ~600 PyTorch op dispatches and their allocations with ~240 barriers, and the GIL is
// released throughout. This header declares what the C interface (capi.cpp) sees; the step itself is
// compiled in llama.cpp, a translation unit of its own (layers/kernels.py builds the units in parallel).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "attention.h"
#include "common.h"
#include "linear.h"

namespace tailserve {

// A linear's packed weight as layers/linear.py built it. The memory is the caller's (models/fused.py
// keeps the arrays alive as long as the model); the sizes say how much of it there must be.
struct Linear {
  PackedWeight pw;

  // w_bytes: the packed buffer's size; s: int8's fp32 scales or the grouped kinds' fp16 (scale, min)
  // pairs, s_count of them (elements).
  Linear(int64_t kind, const void* w, int64_t w_bytes, const void* s, int64_t s_count, int64_t n, int64_t k,
         int64_t group) {
    TS_CHECK(kind >= kBf16 && kind <= kU8, "unknown linear kind ", kind);
    TS_CHECK(w != nullptr && k % 2 == 0 && n > 0, "bad packed weight or odd in_features");
    pw = PackedWeight{static_cast<int>(kind), static_cast<const uint8_t*>(w), nullptr, nullptr, n, k, group};
    TS_CHECK(w_bytes == pw.blocks() * (k / 2) * pw.bytes_per_pair(), "packed weight size mismatch");
    if (kind == kInt8) {
      TS_CHECK(s != nullptr && s_count == pw.blocks() * kBlock, "bad scale");
      pw.scale = static_cast<const float*>(s);
    } else if (pw.grouped()) {
      TS_CHECK(group > 0 && group % 4 == 0 && k % group == 0, "in_features must be a multiple of the group (4n)");
      TS_CHECK(s != nullptr && s_count == pw.blocks() * (k / group) * 64, "bad group scales");
      pw.gscale = static_cast<const uint16_t*>(s);
    }
  }
};

// What a layer of another family adds to Llama's (set_layer_options); null pointers: not there.
struct LayerOptions {
  const float* qkv_bias = nullptr;       // [q + 2·kv dims], added after the QKV linear (Qwen2)
  const float* q_norm = nullptr;         // [head_dim]: RMSNorm over each q head before RoPE (Qwen3, Gemma 3)
  const float* k_norm = nullptr;         // [head_dim]: the same over each k head
  const float* attn_out_norm = nullptr;  // [hidden]: the attention's output normalised before the residual add
  const float* mlp_out_norm = nullptr;   // [hidden]: the MLP's output normalised before the residual add
  bool sliding = false;                  // attends to the last `window` tokens only, with the local RoPE tables
};

struct Layer {
  const float* in_norm;           // fp32 [hidden]
  const float* post_norm;         // fp32 [hidden]: the norm before the MLP
  Linear qkv, o, gate_up, down;   // gate_up interleaved in 16-row halves for the SwiGlu epilogue
  LayerOptions opt{};
};

// One step's batch (Llama::step): flat token ids, per-sequence spans, block tables, rows to sample.
struct Batch {
  const int64_t* ids;             // [T]: every sequence's new tokens, sequence after sequence
  int64_t T;
  const int64_t* seqs;            // [S, 2]: (first position, tokens this step)
  int64_t S;
  const int64_t* tables;          // [S, nblk] block ids
  int64_t nblk;
  const int64_t* sliding_tables;  // [S, nblk_s]: the sliding layers' own pool's; null: `tables`
  int64_t nblk_s;
  int64_t block_size;
  const int64_t* sample_rows;     // [R]: the rows whose logits are returned
  int64_t R;
};

// Every layer's K and V pool: bf16 [blocks, kv_heads, block_size, head_dim] (attention.h's pair layout).
struct Caches {
  uint16_t* const* k;
  uint16_t* const* v;
  const int64_t* blocks;  // [layers]: each layer's pool's blocks
  int64_t layers;
};

class Llama {
 public:
  enum Phase { kEmbed, kNorm, kQkv, kRope, kAttention, kO, kGateUp, kDown, kHead, kPhases };

  // embed: bf16 [vocab, hidden]; norm: fp32 [hidden]; cos, sin: fp32 [positions, head_dim].
  Llama(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, const uint16_t* embed, int64_t vocab,
        int64_t hidden, const float* norm, Linear head, const float* cos, const float* sin, int64_t positions)
      : H_(heads), Hkv_(kv_heads), D_(head_dim), hidden_(hidden), vocab_in_(vocab), positions_(positions),
        eps_(static_cast<float>(eps)), embed_(reinterpret_cast<const BF16*>(embed)), norm_(norm),
        head_(std::move(head)), cos_(cos), sin_(sin), cos_local_(cos), sin_local_(sin),
        attn_scale_(1.f / std::sqrt(static_cast<float>(head_dim))) {
    TS_CHECK(embed && norm && cos && sin && vocab > 0 && hidden > 0 && positions > 0, "missing model tensors");
    TS_CHECK(head_.pw.K == hidden_, "head in_features != hidden size");
    TS_CHECK(heads % kv_heads == 0 && heads / kv_heads <= kMaxPairGroup, "at most 8 query heads per KV head");
    TS_CHECK(head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256,
             "head_dim 16, 32, 64, 128 or 256");
  }

  // The options of the families beyond Llama (models/fused.py sets them; a Llama model never calls
  // this): embeddings × embed_scale, attention scores × attn_scale, the gate's activation (0 SiLU, 1
  // GELU-tanh), final logits soft-capped at final_cap (0: not), the sliding layers' window (tokens,
  // itself included) and RoPE tables.
  void set_family(double embed_scale, double attn_scale, int64_t activation, double final_cap, int64_t window,
                  const float* cos_local, const float* sin_local) {
    TS_CHECK(activation == 0 || activation == 1, "activation: 0 SiLU, 1 GELU-tanh");
    TS_CHECK(final_cap >= 0 && window >= 0 && attn_scale > 0, "bad family options");
    TS_CHECK(cos_local && sin_local, "local rope tables: fp32 [positions, head_dim], as the others");
    embed_scale_ = static_cast<float>(embed_scale);
    attn_scale_ = static_cast<float>(attn_scale);
    gelu_ = activation == 1;
    final_cap_ = static_cast<float>(final_cap);
    window_ = window;
    cos_local_ = cos_local;
    sin_local_ = sin_local;
  }

  // Layer `l`'s options (after add_layer); a null pointer is an option the layer does not have. The
  // lengths (models/fused.py checks them): qkv_bias [q + 2·kv dims], q/k norms [head_dim], output
  // norms [hidden].
  void set_layer_options(int64_t l, const float* qkv_bias, const float* q_norm, const float* k_norm,
                         const float* attn_out_norm, const float* mlp_out_norm, bool sliding) {
    TS_CHECK(l >= 0 && l < static_cast<int64_t>(layers_.size()), "no layer ", l);
    TS_CHECK(!sliding || window_ > 0, "a sliding layer needs set_family's window first");
    TS_CHECK((q_norm == nullptr) == (k_norm == nullptr), "q and k norms come together");
    layers_[l].opt = LayerOptions{qkv_bias, q_norm, k_norm, attn_out_norm, mlp_out_norm, sliding};
  }

  // in_norm, post_norm: fp32 [hidden].
  void add_layer(const float* in_norm, const float* post_norm, Linear qkv, Linear o, Linear gate_up, Linear down) {
    TS_CHECK(in_norm && post_norm, "a layer's norms: fp32 [hidden]");
    const int64_t qd = H_ * D_, kvd = Hkv_ * D_, inter = gate_up.pw.N / 2;
    TS_CHECK(qkv.pw.K == hidden_ && qkv.pw.N == qd + 2 * kvd, "qkv shape");
    TS_CHECK(o.pw.K == qd && o.pw.N == hidden_, "o shape");
    TS_CHECK(gate_up.pw.K == hidden_ && gate_up.pw.N % kBlock == 0, "gate_up: intermediate size must be a multiple of 16");
    TS_CHECK(down.pw.K == inter && down.pw.N == hidden_, "down shape");
    inter_ = inter;
    layers_.push_back(Layer{in_norm, post_norm, std::move(qkv), std::move(o), std::move(gate_up), std::move(down)});
  }

  // fp32 logits [batch.R, vocab] into `out`. depth < number of layers: a draft pass through the first
  // `depth` layers only, then the final norm and the draft head (set_draft_head) if there is one; it
  // writes those layers' KV like the full pass does. With batch.sliding_tables, the sliding layers' KV
  // is in a pool of their own (engine/kv_pools.py): a sequence's blocks behind every window are no
  // longer in it, so only the entries of blocks a window can reach need to name a live block.
  void step(const Batch& batch, const Caches& caches, int64_t depth, float* out) const;  // llama.cpp

  int64_t vocab() const { return head_.pw.N; }

  // Threads that run a step (the caller and threads_ - 1 members of the team).
  void set_threads(int64_t n) {
    TS_CHECK(n >= 1 && n <= 1024, "threads must be in [1, 1024]");
    threads_ = static_cast<int>(n);
  }

  void set_draft_head(Linear head) {
    TS_CHECK(head.pw.K == hidden_ && head.pw.N == head_.pw.N, "draft head shape != head shape");
    draft_head_ = std::make_unique<Linear>(std::move(head));
  }

  // Wall seconds spent in each phase since the last call, then reset: where a step's time goes.
  void take_phase_seconds(double* out) {  // [kPhases], in Phase's order (models/fused.py names them)
    for (int i = 0; i < kPhases; ++i) {
      out[i] = phase_seconds_[i];
      phase_seconds_[i] = 0.0;
    }
  }

 private:
  int64_t H_, Hkv_, D_, hidden_, vocab_in_, positions_, inter_ = 0;
  int threads_ = 1;
  float eps_;
  const BF16* embed_;
  const float* norm_;
  Linear head_;
  std::unique_ptr<Linear> draft_head_;
  const float *cos_, *sin_, *cos_local_, *sin_local_;
  float attn_scale_, embed_scale_ = 1.f, final_cap_ = 0.f;
  bool gelu_ = false;
  int64_t window_ = 0;
  std::vector<Layer> layers_;
  mutable double phase_seconds_[kPhases] = {};
};

}  // namespace tailserve
