// The module's C interface, which layers/kernels.py calls through ctypes: no Python headers and no
// PyTorch, so a serving process loads the kernels without importing torch (~1 s of a start), and the
// build is a plain compiler run. ctypes releases the GIL for every call. The memory behind every
// pointer is the caller's and must outlive what reads it (models/fused.py keeps a model's arrays).
// Every entry returns 0, or -1 with the error's message at ts_error() (per thread): a C++ exception
// never crosses into Python.
// The kernels compile in translation units of their own (llama.cpp: the fused step; ops.cpp: the single
// ops), which layers/kernels.py builds in parallel.
#include <string>

#include "llama.h"
#include "ops.h"

#define TS_API extern "C" __attribute__((visibility("default")))

using namespace tailserve;

namespace {

thread_local std::string last_error;

template <typename F>
int guarded(F&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return -1;
}

}  // namespace

// A packed weight (kinds: linear.h): its buffer and size in bytes, its scales and their count.
struct TsLinear {
  int64_t kind;
  const void* w;
  int64_t w_bytes;
  const void* s;
  int64_t s_count;
  int64_t n, k, group;
};

static Linear linear_of(const TsLinear* l) {
  TS_CHECK(l != nullptr, "no linear");
  return Linear(l->kind, l->w, l->w_bytes, l->s, l->s_count, l->n, l->k, l->group);
}

TS_API const char* ts_error() { return last_error.c_str(); }

TS_API const char* ts_tier() { return tier(); }

TS_API int ts_peak_macs(int64_t threads, int64_t iters, double* out) {
  return guarded([&] { peak_macs(threads, iters, out); });
}

TS_API int ts_linear(const TsLinear* w, const uint16_t* x, int64_t m, uint16_t* y, int64_t threads) {
  return guarded([&] { linear(linear_of(w), x, m, y, static_cast<int>(threads)); });
}

TS_API int ts_decode_attention(int64_t bf16, const void* q, const void* k_cache, const void* v_cache, void* out,
                               int64_t n, int64_t heads, int64_t head_dim, int64_t kv_heads, const int64_t* table,
                               int64_t table_ld, int64_t table_cols, int64_t block_size, const int64_t* lens,
                               double scale, int64_t threads) {
  return guarded([&] {
    decode_attention(bf16 != 0, q, k_cache, v_cache, out, n, heads, head_dim, kv_heads, table, table_ld, table_cols,
                     block_size, lens, scale, static_cast<int>(threads));
  });
}

TS_API int ts_llama_new(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, const uint16_t* embed,
                        int64_t vocab, int64_t hidden, const float* norm, const TsLinear* head, const float* cos,
                        const float* sin, int64_t positions, void** model) {
  return guarded([&] {
    *model = new Llama(heads, kv_heads, head_dim, eps, embed, vocab, hidden, norm, linear_of(head), cos, sin, positions);
  });
}

TS_API void ts_llama_free(void* model) { delete static_cast<Llama*>(model); }

TS_API int ts_llama_set_family(void* model, double embed_scale, double attn_scale, int64_t activation,
                               double final_cap, int64_t window, const float* cos_local, const float* sin_local) {
  return guarded([&] {
    static_cast<Llama*>(model)->set_family(embed_scale, attn_scale, activation, final_cap, window, cos_local,
                                           sin_local);
  });
}

TS_API int ts_llama_add_layer(void* model, const float* in_norm, const float* post_norm, const TsLinear* qkv,
                              const TsLinear* o, const TsLinear* gate_up, const TsLinear* down) {
  return guarded([&] {
    static_cast<Llama*>(model)->add_layer(in_norm, post_norm, linear_of(qkv), linear_of(o), linear_of(gate_up),
                                          linear_of(down));
  });
}

TS_API int ts_llama_set_layer_options(void* model, int64_t layer, const float* qkv_bias, const float* q_norm,
                                      const float* k_norm, const float* attn_out_norm, const float* mlp_out_norm,
                                      int64_t sliding) {
  return guarded([&] {
    static_cast<Llama*>(model)->set_layer_options(layer, qkv_bias, q_norm, k_norm, attn_out_norm, mlp_out_norm,
                                                  sliding != 0);
  });
}

TS_API int ts_llama_set_draft_head(void* model, const TsLinear* head) {
  return guarded([&] { static_cast<Llama*>(model)->set_draft_head(linear_of(head)); });
}

TS_API int ts_llama_set_threads(void* model, int64_t threads) {
  return guarded([&] { static_cast<Llama*>(model)->set_threads(threads); });
}

TS_API int ts_llama_step(const void* model, const Batch* batch, const Caches* caches, int64_t depth, float* out) {
  return guarded([&] { static_cast<const Llama*>(model)->step(*batch, *caches, depth, out); });
}

TS_API int ts_llama_take_phase_seconds(void* model, double* out) {
  return guarded([&] { static_cast<Llama*>(model)->take_phase_seconds(out); });
}
