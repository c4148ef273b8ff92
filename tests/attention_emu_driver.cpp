// Sanitizer driver for csrc/attention.cu under the CPU emulation (built and run by
// tests/test_attention_cuda.py through tests/emu/emu_build.py): the rotary tables, forward and
// backward launchers on small shapes over every path (dtypes, head dims, GQA, causal, grid /
// positions / no rotation, interleaved, cross form, lse gradient), with exactly sized buffers
// (AddressSanitizer sees any access past them) and NaN-poisoned outputs (an unwritten element
// fails); then garbage cu_seqlens / grid / max_seqlen values, which must stay in bounds. Under
// ThreadSanitizer a missing barrier between the block's fiber threads is a reported race.
//
// Usage: attention_emu_driver [schedule] [valid|all]. Exit 0 when every run succeeded and wrote finite
// outputs. "valid" leaves out the garbage-value cases: their overlapping sequences make blocks write
// the same rows (wrong numbers, as documented, but a data race ThreadSanitizer rightly reports).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "attention.cu"

using sigvlp::AttentionArgs;
using sigvlp::AttentionTablesArgs;
using sigvlp::DType;

namespace {

int failures = 0;
int runs = 0;
std::mt19937 rng(4321);

template <typename T>
struct Buf {
  T* p;
  size_t n;
  explicit Buf(size_t count) : p(static_cast<T*>(std::malloc(count ? count * sizeof(T) : 1))), n(count) {}
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
};

struct Half16 {
  DType t;
  size_t n;
  void* p;
  Half16(DType type, size_t count, bool nan) : t(type), n(count), p(std::malloc(count ? count * 2 : 1)) {
    std::normal_distribution<float> dist(0.f, 1.f);
    for (size_t i = 0; i < n; ++i) set(i, nan ? NAN : dist(rng));
  }
  ~Half16() { std::free(p); }
  Half16(const Half16&) = delete;
  void set(size_t i, float v) {
    if (t == DType::kFloat16) static_cast<__half*>(p)[i] = __float2half_rn(v);
    else static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  }
  float get(size_t i) const {
    return t == DType::kFloat16 ? __half2float(static_cast<__half*>(p)[i])
                                : __bfloat162float(static_cast<__nv_bfloat16*>(p)[i]);
  }
  bool finite() const {
    for (size_t i = 0; i < n; ++i)
      if (!std::isfinite(get(i))) return false;
    return true;
  }
};

std::vector<int32_t> cumulative(const std::vector<int>& lengths) {
  std::vector<int32_t> cu(lengths.size() + 1, 0);
  for (size_t i = 0; i < lengths.size(); ++i) cu[i + 1] = cu[i] + lengths[i];
  return cu;
}

std::vector<int32_t> grids(const std::vector<int>& lengths) {
  std::vector<int32_t> g;
  for (int n : lengths) {
    int t = n, h = 1, w = 1;
    if (n > 0 && n % 4 == 0) { t = n / 4; h = 2; w = 2; }
    g.insert(g.end(), {n == 0 ? 0 : t, h, w});
  }
  return g;
}

struct Case {
  const char* name;
  DType dtype;
  int head_dim, nheads, nheads_kv;
  std::vector<int> lq, lk;  // lk empty: self-attention
  int mode;                 // 0 none, 1 grid, 2 positions
  bool causal, interleaved, dlse;
  bool garbage = false;     // cu_seqlens / grid / max values are garbage: only memory safety is checked
};

void check(int code, const std::string& what) {
  ++runs;
  if (code != 0) {
    std::fprintf(stderr, "FAIL %s: error %d (%s)\n", what.c_str(), code, sigvlp_emu::last_error_message());
    ++failures;
  }
}

void run_case(const Case& c) {
  const bool cross = !c.lk.empty();
  const std::vector<int>& lk = cross ? c.lk : c.lq;
  std::vector<int32_t> cu_q = cumulative(c.lq), cu_k = cumulative(lk);
  std::vector<int32_t> grid_q = grids(c.lq), grid_k = grids(lk);
  int64_t total_q = cu_q.back(), total_k = cu_k.back();
  int64_t max_q = 0, max_k = 0;
  for (int n : c.lq) max_q = n > max_q ? n : max_q;
  for (int n : lk) max_k = n > max_k ? n : max_k;
  const int64_t batch = static_cast<int64_t>(c.lq.size());
  if (c.garbage) {  // out-of-range, decreasing and negative offsets; odd grids; max_seqlen too large
    cu_q = {0, 7, 3, -5, 1 << 30, 9};
    cu_k = {-100, 20, 2, 2, 50, 1 << 29};
    grid_q = {0, -3, 5, 1 << 20, 0, 1, 2, 2, 2, -7, 1, 1 << 30, 3, 3, 3};
    grid_k = grid_q;
    total_q = 9;
    total_k = 12;
    max_q = 70;
    max_k = 40;
  }
  const int D = c.head_dim, half = D / 2;
  Half16 q(c.dtype, total_q * c.nheads * D, false), k(c.dtype, total_k * c.nheads_kv * D, false),
      v(c.dtype, total_k * c.nheads_kv * D, false), out(c.dtype, total_q * c.nheads * D, true),
      dout(c.dtype, total_q * c.nheads * D, false), dq(c.dtype, total_q * c.nheads * D, true),
      dk(c.dtype, total_k * c.nheads_kv * D, true), dv(c.dtype, total_k * c.nheads_kv * D, true);
  Buf<float> lse(c.nheads * total_q), dlse(c.nheads * total_q), delta(c.nheads * total_q);
  for (size_t i = 0; i < lse.n; ++i) {
    lse.p[i] = NAN;
    dlse.p[i] = std::normal_distribution<float>(0.f, 1.f)(rng);
  }
  Buf<float> pos_q(total_q * 3), pos_k(total_k * 3);
  for (size_t i = 0; i < pos_q.n; ++i) pos_q.p[i] = std::uniform_real_distribution<float>(0.f, 40.f)(rng);
  for (size_t i = 0; i < pos_k.n; ++i) pos_k.p[i] = std::uniform_real_distribution<float>(0.f, 40.f)(rng);
  const int64_t rows_grid = (max_q > max_k ? max_q : max_k) > 0 ? (max_q > max_k ? max_q : max_k) : 1;
  const int64_t rows_q = c.mode == 2 ? (total_q > 0 ? total_q : 1) : rows_grid;
  const int64_t rows_k = c.mode == 2 ? (total_k > 0 ? total_k : 1) : rows_grid;
  Buf<float> cos_q(rows_q * half), sin_q(rows_q * half), cos_k(rows_k * half), sin_k(rows_k * half);
  const int n_t = D / 8, n_h = (half - n_t) / 2, n_w = half - n_t - n_h;
  auto tables = [&](Buf<float>& cs, Buf<float>& sn, int64_t rows, const float* positions) {
    AttentionTablesArgs t{};
    t.cos = cs.p;
    t.sin = sn.p;
    t.rows = rows;
    t.head_dim = D;
    t.positions = positions;
    t.log2_theta = std::log2(10000.0);
    t.n_t = n_t;
    t.n_h = n_h;
    t.n_w = n_w;
    check(sigvlp::attention_rotary_tables(t), std::string(c.name) + " tables");
  };
  if (c.mode != 0) {
    tables(cos_q, sin_q, rows_q, c.mode == 2 ? pos_q.p : nullptr);
    tables(cos_k, sin_k, rows_k, c.mode == 2 ? pos_k.p : nullptr);
  }
  AttentionArgs a{};
  a.dtype = c.dtype;
  a.q = q.p;
  a.k = k.p;
  a.v = v.p;
  a.out = out.p;
  a.lse = lse.p;
  a.dout = dout.p;
  a.dlse = c.dlse ? dlse.p : nullptr;
  a.delta = delta.p;
  a.dq = dq.p;
  a.dk = dk.p;
  a.dv = dv.p;
  a.total_q = total_q;
  a.total_k = total_k;
  a.nheads = c.nheads;
  a.nheads_kv = c.nheads_kv;
  a.head_dim = D;
  a.batch = batch;
  a.max_q = max_q;
  a.max_k = max_k;
  a.q_stride_token = a.out_stride_token = a.dout_stride_token = a.dq_stride_token = c.nheads * D;
  a.q_stride_head = a.out_stride_head = a.dout_stride_head = a.dq_stride_head = D;
  a.k_stride_token = a.v_stride_token = a.dk_stride_token = a.dv_stride_token = c.nheads_kv * D;
  a.k_stride_head = a.v_stride_head = a.dk_stride_head = a.dv_stride_head = D;
  a.lse_stride_head = a.dlse_stride_head = total_q;
  a.cu_q = cu_q.data();
  a.cu_k = cu_k.data();
  a.grid_q = c.mode == 1 ? grid_q.data() : nullptr;
  a.grid_k = c.mode == 1 ? grid_k.data() : nullptr;
  a.cos_q = c.mode ? cos_q.p : nullptr;
  a.sin_q = c.mode ? sin_q.p : nullptr;
  a.cos_k = c.mode ? cos_k.p : nullptr;
  a.sin_k = c.mode ? sin_k.p : nullptr;
  a.rows_q = rows_q;
  a.rows_k = rows_k;
  a.rotate = c.mode != 0;
  a.positions_q = a.positions_k = c.mode == 2;
  a.interleaved = c.interleaved;
  a.causal = c.causal;
  a.n_t = n_t;
  a.n_h = n_h;
  a.softmax_scale = 1.f / std::sqrt(static_cast<float>(D));
  check(sigvlp::attention_forward(a), std::string(c.name) + " forward");
  check(sigvlp::attention_backward(a), std::string(c.name) + " backward");
  if (c.garbage) return;
  bool lse_ok = true;
  for (size_t i = 0; i < lse.n; ++i) lse_ok = lse_ok && !std::isnan(lse.p[i]);
  if (!out.finite() || !lse_ok || !dq.finite() || !dk.finite() || !dv.finite()) {
    std::fprintf(stderr, "FAIL %s: an output is not finite (unwritten?)\n", c.name);
    ++failures;
  }
}

}  // namespace

int main(int argc, char** argv) {
  const char* schedule = argc > 1 ? argv[1] : "forward";
  if (!sigvlp_emu::set_schedule(schedule)) {
    std::fprintf(stderr, "bad schedule %s\n", schedule);
    return 2;
  }
  const DType f16 = DType::kFloat16, b16 = DType::kBFloat16;
  const std::vector<Case> cases = {
      {"d32-fp16-grid-causal-gqa", f16, 32, 4, 2, {0, 1, 17, 65}, {}, 1, true, false, true},
      {"d64-bf16-positions-il", b16, 64, 2, 1, {33, 0, 5}, {}, 2, false, true, false},
      {"d96-fp16-none-causal", f16, 96, 2, 2, {18, 1}, {}, 0, true, false, false},
      {"d128-bf16-grid", b16, 128, 2, 1, {20, 0, 3}, {}, 1, false, false, true},
      {"d64-fp16-cross-causal", f16, 64, 2, 1, {0, 1, 9, 40}, {12, 0, 1, 33}, 2, true, false, true},
      {"d32-bf16-garbage", b16, 32, 2, 1, {1, 1, 1, 1, 1}, {}, 1, true, false, true, true},
      {"d64-fp16-garbage-cross", f16, 64, 2, 2, {1, 1, 1, 1, 1}, {1, 1, 1, 1, 1}, 2, false, true, false, true},
  };
  const bool garbage = !(argc > 2 && std::string(argv[2]) == "valid");
  for (const Case& c : cases)
    if (garbage || !c.garbage) run_case(c);
  std::printf("attention driver: %d launcher calls, %d failures, schedule %s\n", runs, failures, schedule);
  return failures == 0 ? 0 : 1;
}
