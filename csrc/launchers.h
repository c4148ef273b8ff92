// C++ declarations of the CUDA launchers, shared by the .cu files and bindings.cpp.
// Host-only and free of CUDA and torch headers: bindings.cpp is compiled by the host
// compiler, and the module must never depend on libtorch.
#pragma once
#include <cstdint>

namespace sigvlp {

// Element types understood by every launcher (mirrors sigvlp/ops/_cuda.py).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Launchers return a cudaError_t value (0 = success); error_string() explains it.
const char* error_string(int code);
int device_count();
int runtime_version();
int driver_version();
// The architectures the module was compiled for, as nvcc's __CUDA_ARCH_LIST__ ("800,900").
const char* compiled_arch_list();
// 0 when the module holds a kernel image the given device can run, else a cudaError_t.
int check_kernel_image(int device);

struct Rope3dArgs {
  const void* x;
  void* out;
  DType dtype;
  int64_t total_tokens;
  int64_t nheads;
  int64_t head_dim;
  int64_t x_stride_token, x_stride_head;      // in elements; last dim contiguous
  int64_t out_stride_token, out_stride_head;  // in elements; last dim contiguous
  const int32_t* cu_seqlens;                  // (batch + 1,)
  int64_t batch;
  const int32_t* grid_thw;                    // (batch, 3) or nullptr
  const float* positions;                     // (total_tokens, 3) contiguous or nullptr
  double log2_theta;                          // log2(theta), in fp64
  int32_t n_t, n_h, n_w;                      // rotary pairs per axis
  bool interleaved;
  bool inverse;
  void* stream;                               // cudaStream_t
};

int rope3d(const Rope3dArgs& args);

// ---- sigmoid_loss (csrc/sigmoid_loss.cu) ------------------------------------------------------
// One blockwise pass of the SigLIP sigmoid loss: rows of A (na x d) against all rows of B (nb x d).
// Writes per-CTA partial sums (loss, dt, db), 3 floats per 64 rows of A (not yet times inv_norm),
// and, when da != nullptr, da = (scale * inv_norm) * G B using an fp32 workspace that the caller
// zero-fills, of shape (ceil(na/64)*64, ceil(d/64)*64) with row stride workspace_ld.
struct SigmoidLossPassArgs {
  const void* a;
  const void* b;
  void* da;                  // (na, d) in A's dtype, or nullptr (loss only)
  float* workspace;          // see above; nullptr when da is nullptr
  int64_t workspace_ld;      // in elements, a multiple of 64
  float* partials;           // (ceil(na/64), 3)
  const int64_t* a_ids;      // (na,) or nullptr: then pairs are the diagonal (row == col)
  const int64_t* b_ids;      // (nb,) or nullptr
  const float* scale;        // device scalar t
  const float* bias;         // device scalar b
  DType dtype;
  int64_t na, nb, d;
  int64_t a_stride, b_stride, da_stride;  // row strides in elements; rows contiguous
  float inv_norm;
  void* stream;              // cudaStream_t
};

int sigmoid_loss_pass(const SigmoidLossPassArgs& args);
// ---- end sigmoid_loss ------------------------------------------------------------------------

// ---- newton_schulz (csrc/newton_schulz.cu) ----------------------------------------------------
// `steps` Newton-Schulz iterations on a batch of wide matrices x (batch, rows, cols), rows <= cols,
// contiguous: X_0 = inv_norm[b] * x[b]; per step A = X X^T, B = b A + c A A, X = a X + B X.
// Writes the result to out (any strides). Workspaces, contiguous, of x's dtype: gram and poly
// (batch, rows, rows); scratch0 and scratch1 (batch, rows, cols), which the caller may alias to
// out when out is contiguous (scratch1 only). coefficients: host array of 3 * steps floats.
struct NewtonSchulzArgs {
  const void* x;
  void* out;
  DType dtype;
  int64_t batch, rows, cols;
  int64_t out_stride_batch, out_stride_row, out_stride_col;  // in elements
  const float* inv_norm;                                     // device, (batch,)
  const float* coefficients;                                 // host, (steps, 3)
  int32_t steps;
  void* gram;
  void* poly;
  void* scratch0;
  void* scratch1;
  void* stream;                                              // cudaStream_t
};

int newton_schulz(const NewtonSchulzArgs& args);
// ---- end newton_schulz -----------------------------------------------------------------------

// ---- attention (csrc/attention.cu) -----------------------------------------------------------
// Per-call rotary tables of the fused attention: cos/sin (rows, head_dim / 2) fp32, angles by
// rope3d's code (pos * theta^(-j / n_a), sincosf). positions == nullptr: row r is the grid
// coordinate r (every axis); else row r is token r's position (positions (rows, 3) fp32).
struct AttentionTablesArgs {
  float* cos;
  float* sin;
  int64_t rows;
  int64_t head_dim;
  const float* positions;
  double log2_theta;
  int32_t n_t, n_h, n_w;
  void* stream;
};

// Varlen flash attention with 3D RoPE fused into the q/k tile loads (fp16/bf16). q (total_q,
// nheads, D), k/v (total_k, nheads_kv, D), last dim contiguous, token/head strides in elements.
// Forward writes out and lse (nheads, total_q) fp32 (row stride lse_stride_head). Backward reads
// dout, dlse (or nullptr) and lse, uses delta (nheads, total_q) fp32 scratch with lse's strides,
// and writes dq, dk, dv. Tables from attention_rotary_tables (rows_q/rows_k rows).
struct AttentionArgs {
  DType dtype;
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  const void* dout;
  const float* dlse;
  float* delta;
  void* dq;
  void* dk;
  void* dv;
  int64_t total_q, total_k, nheads, nheads_kv, head_dim, batch, max_q, max_k;
  int64_t q_stride_token, q_stride_head, k_stride_token, k_stride_head, v_stride_token, v_stride_head;
  int64_t out_stride_token, out_stride_head, dout_stride_token, dout_stride_head;
  int64_t dq_stride_token, dq_stride_head, dk_stride_token, dk_stride_head, dv_stride_token, dv_stride_head;
  int64_t lse_stride_head, dlse_stride_head;
  const int32_t* cu_q;     // (batch + 1,)
  const int32_t* cu_k;     // (batch + 1,)
  const int32_t* grid_q;   // (batch, 3) or nullptr
  const int32_t* grid_k;   // (batch, 3) or nullptr
  const float* cos_q;
  const float* sin_q;
  const float* cos_k;
  const float* sin_k;
  int64_t rows_q, rows_k;  // table rows
  bool rotate, positions_q, positions_k, interleaved, causal;
  int32_t n_t, n_h;
  float softmax_scale;
  void* stream;
};

int attention_rotary_tables(const AttentionTablesArgs& args);
int attention_forward(const AttentionArgs& args);
int attention_backward(const AttentionArgs& args);
// ---- end attention ---------------------------------------------------------------------------

}  // namespace sigvlp
