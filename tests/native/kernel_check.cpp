// The fused step's kernels (csrc/linear.h, csrc/attention.h over csrc/simd.h) built alone, without
// PyTorch, for a tier the test machine may not run natively: tests/unit/test_arm_tier.py compiles this
// for AArch64 and runs it under qemu-user. Cases come from a file the test writes (weights packed by
// layers/quant.py), results go to a file it compares against PyTorch.
//   kernel_check IN OUT    prints the tier it was compiled for
// IN: records of little-endian int64 headers and raw arrays, each starting with an op:
//   1 linear:    kind N K group M wbytes sbytes | w[wbytes] s[sbytes] x[M·K] bf16      → y[M·N] bf16
//   2 attention: N H Hkv D bs blocks cols window | q[N·H·D] f32, k, v [blocks·Hkv·bs·D] bf16,
//                table[N·cols], lens[N] int64, scale f32 (window 0: whole context)   → out[N·H·D] bf16
//   0 end
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "attention.h"
#include "linear.h"

namespace {

using namespace tailserve;

struct Reader {
  FILE* f;
  int64_t i64() {
    int64_t v;
    read(&v, sizeof v);
    return v;
  }
  template <class T>
  std::vector<T> array(int64_t n) {
    std::vector<T> v(n);
    read(v.data(), n * sizeof(T));
    return v;
  }
  void read(void* p, size_t n) {
    if (n && std::fread(p, 1, n, f) != n) {
      std::fprintf(stderr, "truncated input\n");
      std::exit(2);
    }
  }
};

std::vector<uint16_t> linear_case(Reader& in) {
  const int64_t kind = in.i64(), N = in.i64(), K = in.i64(), group = in.i64(), M = in.i64();
  const int64_t wbytes = in.i64(), sbytes = in.i64();
  const auto w = in.array<uint8_t>(wbytes);
  const auto s = in.array<uint8_t>(sbytes);
  const auto x = in.array<uint16_t>(M * K);
  PackedWeight pw{static_cast<int>(kind), w.data(), nullptr, nullptr, N, K, group};
  if (kind == kInt8) pw.scale = reinterpret_cast<const float*>(s.data());
  if (pw.grouped()) pw.gscale = reinterpret_cast<const uint16_t*>(s.data());
  std::vector<uint16_t> y(M * N);
  InputScratch scratch;
  const Input x_in = prepare_input(pw, x.data(), K, M, scratch);
  linear_blocks(pw, x_in, M, 0, pw.blocks(), StoreBf16{y.data(), N, N});
  return y;
}

std::vector<uint16_t> attention_case(Reader& in) {
  const int64_t N = in.i64(), H = in.i64(), Hkv = in.i64(), D = in.i64(), bs = in.i64(), blocks = in.i64(),
                cols = in.i64(), window = in.i64();
  const auto q = in.array<float>(N * H * D);
  const auto k = in.array<uint16_t>(blocks * Hkv * bs * D);
  const auto v = in.array<uint16_t>(blocks * Hkv * bs * D);
  const auto table = in.array<int64_t>(N * cols);
  const auto lens = in.array<int64_t>(N);
  float scale;
  in.read(&scale, sizeof scale);
  std::vector<int64_t> row_seq(N), starts(N);
  for (int64_t n = 0; n < N; ++n) {
    row_seq[n] = n;
    starts[n] = window > 0 ? std::max<int64_t>(0, lens[n] - window) : 0;
  }
  std::vector<uint16_t> out(N * H * D);
  const PairAttentionArgs a{H,           Hkv,   D,          bs,    q.data(),      H * D, k.data(), v.data(), table.data(),
                            cols,        row_seq.data(), lens.data(), scale, out.data(), H * D, starts.data()};
  pair_attention_items(a, 0, N * Hkv);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: kernel_check IN OUT\n");
    return 2;
  }
  Reader in{std::fopen(argv[1], "rb")};
  FILE* out = std::fopen(argv[2], "wb");
  if (!in.f || !out) return 2;
  for (int64_t op; (op = in.i64()) != 0;) {
    const std::vector<uint16_t> r = op == 1 ? linear_case(in) : op == 2 ? attention_case(in) : std::vector<uint16_t>{};
    if (op != 1 && op != 2) return 2;
    std::fwrite(r.data(), sizeof(uint16_t), r.size(), out);
  }
  std::fclose(out);
  std::puts(TAILSERVE_TIER);
  return 0;
}
