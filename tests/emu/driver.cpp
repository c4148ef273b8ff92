// Sanitizer driver for the CPU emulation of csrc/ (built and run by tests/test_cuda_emu.py):
// every launcher path of every kernel on small shapes, with buffers allocated at their exact
// sizes (so AddressSanitizer sees any access past them) and outputs poisoned with NaN (so an
// unwritten element fails). Under ThreadSanitizer, the block's threads are fibers whose only
// synchronisation is the emulated barriers: a missing __syncthreads is a reported race.
//
// Usage: driver [schedule]   (forward, reversed, shuffle:SEED). Exit 0 when every run succeeded
// and wrote finite outputs; the sanitizers exit non-zero on their own reports.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <mma.h>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "emu/sigvlp_emu.h"
#include "launchers.h"

using sigvlp::DType;

namespace {

int failures = 0;
int runs = 0;
std::mt19937 rng(1234);

void fail(const std::string& what) {
  std::fprintf(stderr, "FAIL %s\n", what.c_str());
  ++failures;
}

size_t elem_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// A buffer of n elements of type t, exactly sized (malloc), filled from a normal distribution.
struct Buf {
  std::vector<unsigned char>* dummy = nullptr;
  void* p = nullptr;
  size_t n = 0;
  DType t = DType::kFloat32;
  Buf(size_t count, DType type, float scale = 1.f, bool nan = false) : n(count), t(type) {
    p = std::malloc(std::max<size_t>(1, n * elem_size(t)));
    std::normal_distribution<float> dist(0.f, scale);
    for (size_t i = 0; i < n; ++i) set(i, nan ? NAN : dist(rng));
  }
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
  void set(size_t i, float v) {
    if (t == DType::kFloat32) static_cast<float*>(p)[i] = v;
    else if (t == DType::kFloat16) static_cast<__half*>(p)[i] = __float2half_rn(v);
    else static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  }
  float get(size_t i) const {
    if (t == DType::kFloat32) return static_cast<float*>(p)[i];
    if (t == DType::kFloat16) return __half2float(static_cast<__half*>(p)[i]);
    return __bfloat162float(static_cast<__nv_bfloat16*>(p)[i]);
  }
  // Every element at (i0 * s0 + i1 * s1 + i2 * s2) for the given extents is finite.
  bool finite(int64_t e0, int64_t s0, int64_t e1, int64_t s1, int64_t e2, int64_t s2) const {
    for (int64_t a = 0; a < e0; ++a)
      for (int64_t b = 0; b < e1; ++b)
        for (int64_t c = 0; c < e2; ++c)
          if (!std::isfinite(get(static_cast<size_t>(a * s0 + b * s1 + c * s2)))) return false;
    return true;
  }
};

const char* name(DType t) { return t == DType::kFloat32 ? "fp32" : t == DType::kFloat16 ? "fp16" : "bf16"; }

void check(int code, const std::string& what) {
  ++runs;
  if (code != 0) fail(what + ": launcher returned " + std::to_string(code) + " (" + sigvlp_emu::last_error_message() + ")");
}

// ---- rope3d ----
void rope(DType t, bool interleaved, int pad, bool positions, const std::vector<int32_t>& cu,
          const std::vector<int32_t>& grid, int64_t total, bool expect_finite = true) {
  const int64_t nheads = 2, head_dim = 32, row = head_dim + pad;
  Buf x(total * nheads * row, t), out(total * nheads * row, t, 1.f, true);
  std::vector<int32_t>* cu_copy = new std::vector<int32_t>(cu);
  int32_t* cu_buf = static_cast<int32_t*>(std::malloc(cu.size() * 4));
  std::memcpy(cu_buf, cu.data(), cu.size() * 4);
  int32_t* grid_buf = static_cast<int32_t*>(std::malloc(std::max<size_t>(1, grid.size()) * 4));
  std::memcpy(grid_buf, grid.data(), grid.size() * 4);
  float* pos = static_cast<float*>(std::malloc(std::max<int64_t>(1, total * 3) * 4));
  for (int64_t i = 0; i < total * 3; ++i) pos[i] = static_cast<float>(rng() % 1000) * 0.37f;
  sigvlp::Rope3dArgs a{};
  a.x = x.p;
  a.out = out.p;
  a.dtype = t;
  a.total_tokens = total;
  a.nheads = nheads;
  a.head_dim = head_dim;
  a.x_stride_token = nheads * row;
  a.x_stride_head = row;
  a.out_stride_token = nheads * row;
  a.out_stride_head = row;
  a.cu_seqlens = cu_buf;
  a.batch = static_cast<int64_t>(cu.size()) - 1;
  a.grid_thw = grid_buf;
  a.positions = positions ? pos : nullptr;
  a.log2_theta = std::log2(10000.0);
  a.n_t = 4;
  a.n_h = 6;
  a.n_w = 6;
  a.interleaved = interleaved;
  a.inverse = pad == 2;
  const std::string what = std::string("rope3d ") + name(t) + (interleaved ? " interleaved" : "") + " pad " +
                           std::to_string(pad) + (positions ? " positions" : " grid");
  check(sigvlp::rope3d(a), what);
  if (expect_finite && !out.finite(total * nheads, row, 1, 0, head_dim, 1)) fail(what + ": unwritten outputs");
  std::free(cu_buf);
  std::free(grid_buf);
  std::free(pos);
  delete cu_copy;
}

// ---- newton_schulz ----
void ns(DType t, int64_t batch, int64_t p, int64_t q, int steps, bool strided_out) {
  Buf x(batch * p * q, t), gram(batch * p * p, t), poly(batch * p * p, t), s0(batch * p * q, t), s1(batch * p * q, t);
  Buf out(batch * p * q, t, 1.f, true);
  std::vector<float> inv(batch);
  for (int64_t b = 0; b < batch; ++b) {
    double n2 = 0;
    for (int64_t i = 0; i < p * q; ++i) n2 += double(x.get(b * p * q + i)) * x.get(b * p * q + i);
    inv[b] = static_cast<float>(1.0 / std::sqrt(n2));
  }
  float* inv_buf = static_cast<float*>(std::malloc(batch * 4));
  std::memcpy(inv_buf, inv.data(), batch * 4);
  std::vector<float> coeffs;
  for (int s = 0; s < steps; ++s) coeffs.insert(coeffs.end(), {3.4445f, -4.7750f, 2.0315f});
  sigvlp::NewtonSchulzArgs a{};
  a.x = x.p;
  a.out = out.p;
  a.dtype = t;
  a.batch = batch;
  a.rows = p;
  a.cols = q;
  // strided: out is the transpose view of a (batch, q, p) buffer
  a.out_stride_batch = p * q;
  a.out_stride_row = strided_out ? 1 : q;
  a.out_stride_col = strided_out ? p : 1;
  a.inv_norm = inv_buf;
  a.coefficients = coeffs.data();
  a.steps = steps;
  a.gram = gram.p;
  a.poly = poly.p;
  a.scratch0 = s0.p;
  a.scratch1 = strided_out ? s1.p : out.p;  // the op aliases scratch1 to a contiguous output
  const std::string what = std::string("newton_schulz ") + name(t) + " " + std::to_string(batch) + "x" +
                           std::to_string(p) + "x" + std::to_string(q) + " steps " + std::to_string(steps) +
                           (strided_out ? " strided" : "");
  check(sigvlp::newton_schulz(a), what);
  if (!out.finite(batch, p * q, p, a.out_stride_row, q, a.out_stride_col)) fail(what + ": unwritten outputs");
  std::free(inv_buf);
}

// ---- sigmoid loss pass ----
void sl(DType t, int64_t na, int64_t nb, int64_t d, bool ids, bool grad) {
  Buf a(na * d, t, 0.2f), b(nb * d, t, 0.2f), da(na * d, t, 1.f, true);
  const int64_t blocks = (na + 63) / 64, ld = (d + 63) / 64 * 64;
  float* ws = static_cast<float*>(std::calloc(blocks * 64 * ld, 4));
  float* partials = static_cast<float*>(std::malloc(blocks * 3 * 4));
  int64_t* aid = static_cast<int64_t*>(std::malloc(na * 8));
  int64_t* bid = static_cast<int64_t*>(std::malloc(nb * 8));
  for (int64_t i = 0; i < na; ++i) aid[i] = static_cast<int64_t>(rng() % 7);
  for (int64_t i = 0; i < nb; ++i) bid[i] = static_cast<int64_t>(rng() % 7);
  float* scale = static_cast<float*>(std::malloc(4));
  float* bias = static_cast<float*>(std::malloc(4));
  *scale = 10.f;
  *bias = -10.f;
  sigvlp::SigmoidLossPassArgs p{};
  p.a = a.p;
  p.b = b.p;
  p.da = grad ? da.p : nullptr;
  p.workspace = grad ? ws : nullptr;
  p.workspace_ld = grad ? ld : 0;
  p.partials = partials;
  p.a_ids = ids ? aid : nullptr;
  p.b_ids = ids ? bid : nullptr;
  p.scale = scale;
  p.bias = bias;
  p.dtype = t;
  p.na = na;
  p.nb = nb;
  p.d = d;
  p.a_stride = d;
  p.b_stride = d;
  p.da_stride = d;
  p.inv_norm = 1.f / static_cast<float>(na);
  const std::string what = std::string("sigmoid_loss_pass ") + name(t) + " " + std::to_string(na) + "x" +
                           std::to_string(nb) + "x" + std::to_string(d) + (ids ? " ids" : "") + (grad ? " grad" : "");
  check(sigvlp::sigmoid_loss_pass(p), what);
  for (int64_t i = 0; i < blocks * 3; ++i)
    if (!std::isfinite(partials[i])) fail(what + ": partials");
  if (grad && !da.finite(na, d, d, 1, 1, 0)) fail(what + ": unwritten gradient");
  for (void* v : {static_cast<void*>(ws), static_cast<void*>(partials), static_cast<void*>(aid),
                  static_cast<void*>(bid), static_cast<void*>(scale), static_cast<void*>(bias)})
    std::free(v);
}

// ---- fused attention (csrc/attention.cu): forward and backward, grid rotation, GQA ----
void attention(DType t, int64_t head_dim, bool causal, const std::vector<int32_t>& lengths) {
  const int64_t nheads = 4, nheads_kv = 2, batch = static_cast<int64_t>(lengths.size());
  std::vector<int32_t> cu(1, 0), grid;
  int64_t max_len = 0;
  for (int32_t n : lengths) {
    cu.push_back(cu.back() + n);
    max_len = std::max<int64_t>(max_len, n);
    grid.insert(grid.end(), {n ? n : 0, 1, 1});  // (T, 1, 1): T = n
  }
  const int64_t total = cu.back(), half = head_dim / 2;
  const int32_t n_t = static_cast<int32_t>(half / 4), n_h = static_cast<int32_t>(3 * half / 8),
                n_w = static_cast<int32_t>(half - half / 4 - 3 * half / 8);
  Buf q(total * nheads * head_dim, t), k(total * nheads_kv * head_dim, t), v(total * nheads_kv * head_dim, t);
  Buf out(total * nheads * head_dim, t, 1.f, true), dout(total * nheads * head_dim, t);
  Buf dq(total * nheads * head_dim, t, 1.f, true), dk(total * nheads_kv * head_dim, t, 1.f, true),
      dv(total * nheads_kv * head_dim, t, 1.f, true);
  Buf lse(nheads * total, DType::kFloat32, 1.f, true), delta(nheads * total, DType::kFloat32, 1.f, true);
  const int64_t rows = std::max<int64_t>(max_len, 1);
  Buf cos(rows * half, DType::kFloat32, 1.f, true), sin(rows * half, DType::kFloat32, 1.f, true);
  int32_t* cu_buf = static_cast<int32_t*>(std::malloc(cu.size() * 4));
  int32_t* grid_buf = static_cast<int32_t*>(std::malloc(grid.size() * 4));
  std::memcpy(cu_buf, cu.data(), cu.size() * 4);
  std::memcpy(grid_buf, grid.data(), grid.size() * 4);
  const std::string what = std::string("attention ") + name(t) + " D " + std::to_string(head_dim) +
                           (causal ? " causal" : "");

  sigvlp::AttentionTablesArgs ta{};
  ta.cos = static_cast<float*>(cos.p);
  ta.sin = static_cast<float*>(sin.p);
  ta.rows = rows;
  ta.head_dim = head_dim;
  ta.positions = nullptr;
  ta.log2_theta = std::log2(10000.0);
  ta.n_t = n_t;
  ta.n_h = n_h;
  ta.n_w = n_w;
  check(sigvlp::attention_rotary_tables(ta), what + " tables");

  sigvlp::AttentionArgs a{};
  a.dtype = t;
  a.q = q.p;
  a.k = k.p;
  a.v = v.p;
  a.out = out.p;
  a.lse = static_cast<float*>(lse.p);
  a.total_q = a.total_k = total;
  a.nheads = nheads;
  a.nheads_kv = nheads_kv;
  a.head_dim = head_dim;
  a.batch = batch;
  a.max_q = a.max_k = max_len;
  a.q_stride_token = a.out_stride_token = a.dout_stride_token = a.dq_stride_token = nheads * head_dim;
  a.k_stride_token = a.v_stride_token = a.dk_stride_token = a.dv_stride_token = nheads_kv * head_dim;
  a.q_stride_head = a.k_stride_head = a.v_stride_head = a.out_stride_head = a.dout_stride_head = head_dim;
  a.dq_stride_head = a.dk_stride_head = a.dv_stride_head = head_dim;
  a.lse_stride_head = total;
  a.cu_q = a.cu_k = cu_buf;
  a.grid_q = a.grid_k = grid_buf;
  a.cos_q = a.cos_k = static_cast<float*>(cos.p);
  a.sin_q = a.sin_k = static_cast<float*>(sin.p);
  a.rows_q = a.rows_k = rows;
  a.rotate = true;
  a.causal = causal;
  a.n_t = n_t;
  a.n_h = n_h;
  a.softmax_scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  check(sigvlp::attention_forward(a), what + " forward");
  if (!out.finite(total * nheads, head_dim, head_dim, 1, 1, 0)) fail(what + ": unwritten outputs");
  a.dout = dout.p;
  a.dlse = nullptr;
  a.delta = static_cast<float*>(delta.p);
  a.dq = dq.p;
  a.dk = dk.p;
  a.dv = dv.p;
  check(sigvlp::attention_backward(a), what + " backward");
  if (!dq.finite(total * nheads, head_dim, head_dim, 1, 1, 0) ||
      !dk.finite(total * nheads_kv, head_dim, head_dim, 1, 1, 0) ||
      !dv.finite(total * nheads_kv, head_dim, head_dim, 1, 1, 0))
    fail(what + ": unwritten gradients");
  std::free(cu_buf);
  std::free(grid_buf);
}

// ---- the emulated number formats ----
float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// Every half / bf16 value converts to float and back unchanged; every midpoint between two
// neighbours rounds to the even one (round to nearest even, as __float2half_rn /
// __float2bfloat16_rn); values past the largest finite half go to infinity.
void number_formats() {
  for (uint32_t h = 0; h < 0x7c00; ++h) {  // non-negative finite halves
    __half x;
    x.__x = static_cast<unsigned short>(h);
    const float f = __half2float(x);
    if (__float2half_rn(f).__x != h || __float2half_rn(-f).__x != (h | 0x8000u)) fail("half round trip");
    if (h + 1 < 0x7c00) {
      __half y;
      y.__x = static_cast<unsigned short>(h + 1);
      const float mid = 0.5f * (f + __half2float(y));  // exact in fp32
      if (__float2half_rn(mid).__x != ((h & 1u) ? h + 1 : h)) fail("half ties to even");
    }
  }
  if (__float2half_rn(65520.f).__x != 0x7c00u || __float2half_rn(65519.f).__x != 0x7bffu) fail("half overflow");
  for (uint32_t h = 0; h < 0x7f80; ++h) {  // non-negative finite bf16
    __nv_bfloat16 x;
    x.__x = static_cast<unsigned short>(h);
    const float f = __bfloat162float(x);
    if (__float2bfloat16_rn(f).__x != h) fail("bf16 round trip");
    const float mid = bits_to_float((h << 16) | 0x8000u);
    if (h + 1 < 0x7f80 && __float2bfloat16_rn(mid).__x != ((h & 1u) ? h + 1 : h)) fail("bf16 ties to even");
  }
  // TF32 (cvt.rna.tf32.f32): 10 mantissa bits, nearest, ties away from zero.
  namespace wmma = nvcuda::wmma;
  const float one = 1.f, ulp = std::ldexp(1.f, -10);
  if (wmma::__float_to_tf32(one + 0.5f * ulp) != one + ulp) fail("tf32 tie away (up)");
  if (wmma::__float_to_tf32(-(one + 0.5f * ulp)) != -(one + ulp)) fail("tf32 tie away (down)");
  if (wmma::__float_to_tf32(one + 1.5f * ulp) != one + 2 * ulp) fail("tf32 tie away from an odd neighbour");
  if (wmma::__float_to_tf32(one + 0.5f * ulp - std::ldexp(1.f, -23)) != one) fail("tf32 below the tie");
  if (wmma::__float_to_tf32(bits_to_float(0x00001000u)) != bits_to_float(0x00002000u)) fail("tf32 subnormal tie");
  ++runs;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && !sigvlp_emu::set_schedule(argv[1])) {
    std::fprintf(stderr, "unknown schedule %s\n", argv[1]);
    return 2;
  }
  number_formats();
  const DType types[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  for (DType t : types) {
    for (bool inter : {false, true})
      for (int pad : {0, 2})  // 0: 16-byte vector path; 2: scalar path
        for (bool positions : {false, true}) rope(t, inter, pad, positions, {0, 5, 5, 40, 43}, {1, 1, 5, 1, 1, 1, 5, 1, 7, 3, 1, 1}, 43);
  }
  // Issue 14 #1: any int32 cu_seqlens / grid values stay in bounds.
  rope(DType::kFloat32, false, 0, false, {5, 3, 100}, {0, 0, 0, -1, 7, -3}, 10);
  rope(DType::kFloat32, false, 0, false, {-7, 2147483647, -2147483647 - 1}, {2147483647, 2147483647, 2147483647, 1, -2147483647 - 1, 1}, 10);
  rope(DType::kFloat16, true, 2, false, {0, 0, 0}, {1, 1, 1, 1, 1, 1}, 10);
  // Grid-stride loop: more slots than sm_count * 32 blocks of 256 threads.
  rope(DType::kBFloat16, false, 0, true, {0, 9000}, {1, 1, 9000}, 9000);

  sigvlp_emu::config().max_grid_y = 2;  // batch chunking: 3 matrices -> launches of 2 and 1
  for (DType t : types) {
    ns(t, 3, 20, 36, 1, false);
    ns(t, 1, 80, 130, 2, false);   // partial tiles, 2 x 3 tiles, mirror tiles in syrk
    ns(t, 1, 65, 65, 1, true);     // strided output
    ns(t, 3, 8, 8, 0, true);       // steps = 0: the scale kernel, chunked
  }
  for (DType t : types) {
    sl(t, 70, 130, 72, true, true);
    sl(t, 64, 64, 32, false, true);
    sl(t, 5, 3, 16, true, false);
    sl(t, 129, 65, 100, false, false);
  }
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    attention(t, 64, false, {5, 40, 0, 17});
    attention(t, 32, true, {70, 3});
  }
  std::printf("driver: %d launcher calls, %d failures, schedule %s, sanitizer '%s'\n", runs, failures,
              sigvlp_emu::schedule_name(), sigvlp_emu::sanitizer());
  return failures == 0 ? 0 : 1;
}
