// C++ declarations of the CUDA launchers, shared by the .cu files and bindings.cpp.
// Host-only and free of CUDA and torch headers: bindings.cpp is compiled by the host
// compiler, and the module must never depend on libtorch.
#pragma once
#include <cstdint>

namespace sigvlp {

// Element types understood by every launcher (mirrors sigvlp/ops/_cuda.py).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Every launcher takes one Args struct whose members are declared once, as an X-macro list beside
// it: X(type, name) for a value or a device pointer (an integer at the binding), F(name, count,
// per) for a host float array of `per` floats per unit of the member `count` (a Python sequence at
// the binding). The list defines the struct here and, in bindings.cpp, the keyword arguments of the
// launcher's Python function (sigvlp._cuda and sigvlp._cuda_emu), so a new argument is named once
// in C++ and once in the Python call (sigvlp/ops), which the binding checks by name.
#define SIGVLP_MEMBER(type, name) type name;
#define SIGVLP_HOST_FLOATS_MEMBER(name, count, per) const float* name;

// Launchers return a cudaError_t value (0 = success); error_string() explains it.
const char* error_string(int code);
int device_count();
int runtime_version();
int driver_version();
// The architectures the module was compiled for, as nvcc's __CUDA_ARCH_LIST__ ("800,900").
const char* compiled_arch_list();
// 0 when the module holds a kernel image the given device can run, else a cudaError_t.
int check_kernel_image(int device);

#define SIGVLP_ROPE3D_ARGS(X, F)                                           \
  X(const void*, x)                                                        \
  X(void*, out)                                                            \
  X(DType, dtype)                                                          \
  X(int64_t, total_tokens)                                                 \
  X(int64_t, nheads)                                                       \
  X(int64_t, head_dim)                                                     \
  X(int64_t, x_stride_token) /* in elements; last dim contiguous */        \
  X(int64_t, x_stride_head)                                                \
  X(int64_t, out_stride_token) /* in elements; last dim contiguous */      \
  X(int64_t, out_stride_head)                                              \
  X(const int32_t*, cu_seqlens) /* (batch + 1,) */                         \
  X(int64_t, batch)                                                        \
  X(const int32_t*, grid_thw) /* (batch, 3) or nullptr */                  \
  X(const float*, positions) /* (total_tokens, 3) contiguous or nullptr */ \
  X(double, log2_theta) /* log2(theta), in fp64 */                         \
  X(int32_t, n_t) /* rotary pairs per axis */                              \
  X(int32_t, n_h)                                                          \
  X(int32_t, n_w)                                                          \
  X(bool, interleaved)                                                     \
  X(bool, inverse)                                                         \
  X(void*, stream) /* cudaStream_t */
struct Rope3dArgs {
  SIGVLP_ROPE3D_ARGS(SIGVLP_MEMBER, SIGVLP_HOST_FLOATS_MEMBER)
};

int rope3d(const Rope3dArgs& args);

// ---- sigmoid_loss (csrc/sigmoid_loss.cu) ------------------------------------------------------
// One blockwise pass of the SigLIP sigmoid loss: rows of A (na x d) against all rows of B (nb x d).
// Writes per-CTA partial sums (loss, dt, db), 3 floats per 64 rows of A (not yet times inv_norm),
// and, when da != nullptr, da = (scale * inv_norm) * G B using an fp32 workspace that the caller
// zero-fills, of shape (ceil(na/64)*64, ceil(d/64)*64) with row stride workspace_ld.
#define SIGVLP_SIGMOID_LOSS_PASS_ARGS(X, F)                                                 \
  X(const void*, a)                                                                         \
  X(const void*, b)                                                                         \
  X(void*, da) /* (na, d) in A's dtype, or nullptr (loss only) */                           \
  X(float*, workspace) /* see above; nullptr when da is nullptr */                          \
  X(int64_t, workspace_ld) /* in elements, a multiple of 64 */                              \
  X(float*, partials) /* (ceil(na/64), 3) */                                                \
  X(const int64_t*, a_ids) /* (na,) or nullptr: then pairs are the diagonal (row == col) */ \
  X(const int64_t*, b_ids) /* (nb,) or nullptr */                                           \
  X(const float*, scale) /* device scalar t */                                              \
  X(const float*, bias) /* device scalar b */                                               \
  X(DType, dtype)                                                                           \
  X(int64_t, na)                                                                            \
  X(int64_t, nb)                                                                            \
  X(int64_t, d)                                                                             \
  X(int64_t, a_stride) /* row strides in elements; rows contiguous */                       \
  X(int64_t, b_stride)                                                                      \
  X(int64_t, da_stride)                                                                     \
  X(float, inv_norm)                                                                        \
  X(void*, stream) /* cudaStream_t */
struct SigmoidLossPassArgs {
  SIGVLP_SIGMOID_LOSS_PASS_ARGS(SIGVLP_MEMBER, SIGVLP_HOST_FLOATS_MEMBER)
};

int sigmoid_loss_pass(const SigmoidLossPassArgs& args);
// ---- end sigmoid_loss ------------------------------------------------------------------------

// ---- newton_schulz (csrc/newton_schulz.cu) ----------------------------------------------------
// `steps` Newton-Schulz iterations on a batch of wide matrices x (batch, rows, cols), rows <= cols,
// contiguous: X_0 = inv_norm[b] * x[b]; per step A = X X^T, B = b A + c A A, X = a X + B X.
// Writes the result to out (any strides). Workspaces, contiguous, of x's dtype: gram and poly
// (batch, rows, rows); scratch0 and scratch1 (batch, rows, cols), which the caller may alias to
// out when out is contiguous (scratch1 only). coefficients: host array of 3 * steps floats.
#define SIGVLP_NEWTON_SCHULZ_ARGS(X, F)                                                   \
  X(const void*, x)                                                                       \
  X(void*, out)                                                                           \
  X(DType, dtype)                                                                         \
  X(int64_t, batch)                                                                       \
  X(int64_t, rows)                                                                        \
  X(int64_t, cols)                                                                        \
  X(int64_t, out_stride_batch) /* in elements */                                          \
  X(int64_t, out_stride_row)                                                              \
  X(int64_t, out_stride_col)                                                              \
  X(const float*, inv_norm) /* device, (batch,) */                                        \
  X(int32_t, steps)                                                                       \
  F(coefficients, steps, 3) /* host, (steps, 3): a Python sequence of 3 * steps floats */ \
  X(void*, gram)                                                                          \
  X(void*, poly)                                                                          \
  X(void*, scratch0)                                                                      \
  X(void*, scratch1)                                                                      \
  X(void*, stream) /* cudaStream_t */
struct NewtonSchulzArgs {
  SIGVLP_NEWTON_SCHULZ_ARGS(SIGVLP_MEMBER, SIGVLP_HOST_FLOATS_MEMBER)
};

int newton_schulz(const NewtonSchulzArgs& args);
// ---- end newton_schulz -----------------------------------------------------------------------

// ---- attention (csrc/attention.cu) -----------------------------------------------------------
// Per-call rotary tables of the fused attention: cos/sin (rows, head_dim / 2) fp32, angles by
// rope3d's code (pos * theta^(-j / n_a), sincosf). positions == nullptr: row r is the grid
// coordinate r (every axis); else row r is token r's position (positions (rows, 3) fp32).
#define SIGVLP_ATTENTION_TABLES_ARGS(X, F) \
  X(float*, cos)                           \
  X(float*, sin)                           \
  X(int64_t, rows)                         \
  X(int64_t, head_dim)                     \
  X(const float*, positions)               \
  X(double, log2_theta)                    \
  X(int32_t, n_t)                          \
  X(int32_t, n_h)                          \
  X(int32_t, n_w)                          \
  X(void*, stream)
struct AttentionTablesArgs {
  SIGVLP_ATTENTION_TABLES_ARGS(SIGVLP_MEMBER, SIGVLP_HOST_FLOATS_MEMBER)
};

// Varlen flash attention with 3D RoPE fused into the q/k tile loads (fp16/bf16). q (total_q,
// nheads, D), k/v (total_k, nheads_kv, D), last dim contiguous, token/head strides in elements.
// Forward writes out and lse (nheads, total_q) fp32 (row stride lse_stride_head). Backward reads
// dout, dlse (or nullptr) and lse, uses delta (nheads, total_q) fp32 scratch with lse's strides,
// and writes dq, dk, dv. Tables from attention_rotary_tables (rows_q/rows_k rows).
#define SIGVLP_ATTENTION_ARGS(X, F)                     \
  X(DType, dtype)                                       \
  X(const void*, q)                                     \
  X(const void*, k)                                     \
  X(const void*, v)                                     \
  X(void*, out)                                         \
  X(float*, lse)                                        \
  X(const void*, dout)                                  \
  X(const float*, dlse)                                 \
  X(float*, delta)                                      \
  X(void*, dq)                                          \
  X(void*, dk)                                          \
  X(void*, dv)                                          \
  X(int64_t, total_q)                                   \
  X(int64_t, total_k)                                   \
  X(int64_t, nheads)                                    \
  X(int64_t, nheads_kv)                                 \
  X(int64_t, head_dim)                                  \
  X(int64_t, batch)                                     \
  X(int64_t, max_q)                                     \
  X(int64_t, max_k)                                     \
  X(int64_t, q_stride_token)                            \
  X(int64_t, q_stride_head)                             \
  X(int64_t, k_stride_token)                            \
  X(int64_t, k_stride_head)                             \
  X(int64_t, v_stride_token)                            \
  X(int64_t, v_stride_head)                             \
  X(int64_t, out_stride_token)                          \
  X(int64_t, out_stride_head)                           \
  X(int64_t, dout_stride_token)                         \
  X(int64_t, dout_stride_head)                          \
  X(int64_t, dq_stride_token)                           \
  X(int64_t, dq_stride_head)                            \
  X(int64_t, dk_stride_token)                           \
  X(int64_t, dk_stride_head)                            \
  X(int64_t, dv_stride_token)                           \
  X(int64_t, dv_stride_head)                            \
  X(int64_t, lse_stride_head)                           \
  X(int64_t, dlse_stride_head)                          \
  X(const int32_t*, cu_q) /* (batch + 1,) */            \
  X(const int32_t*, cu_k) /* (batch + 1,) */            \
  X(const int32_t*, grid_q) /* (batch, 3) or nullptr */ \
  X(const int32_t*, grid_k) /* (batch, 3) or nullptr */ \
  X(const float*, cos_q)                                \
  X(const float*, sin_q)                                \
  X(const float*, cos_k)                                \
  X(const float*, sin_k)                                \
  X(int64_t, rows_q) /* table rows */                   \
  X(int64_t, rows_k)                                    \
  X(bool, rotate)                                       \
  X(bool, positions_q)                                  \
  X(bool, positions_k)                                  \
  X(bool, interleaved)                                  \
  X(bool, causal)                                       \
  X(int32_t, n_t)                                       \
  X(int32_t, n_h)                                       \
  X(float, softmax_scale)                               \
  X(void*, stream)
struct AttentionArgs {
  SIGVLP_ATTENTION_ARGS(SIGVLP_MEMBER, SIGVLP_HOST_FLOATS_MEMBER)
};

int attention_rotary_tables(const AttentionTablesArgs& args);
int attention_forward(const AttentionArgs& args);
int attention_backward(const AttentionArgs& args);
// ---- end attention ---------------------------------------------------------------------------

}  // namespace sigvlp

// Every launcher bound as a Python function of the module: L(name, Args struct, its X-macro list,
// doc). The function sigvlp::<name> and the Python function <name> take that struct's fields.
#define SIGVLP_LAUNCHERS(L)                                                                                 \
  L(rope3d, Rope3dArgs, SIGVLP_ROPE3D_ARGS, "3D RoPE over varlen packed sequences (csrc/rope.cu).")           \
  L(sigmoid_loss_pass, SigmoidLossPassArgs, SIGVLP_SIGMOID_LOSS_PASS_ARGS,                                  \
    "One blockwise sigmoid-loss pass (csrc/sigmoid_loss.cu).")                                              \
  L(newton_schulz, NewtonSchulzArgs, SIGVLP_NEWTON_SCHULZ_ARGS,                                             \
    "Batched Newton-Schulz iterations (csrc/newton_schulz.cu).")                                            \
  L(attention_rotary_tables, AttentionTablesArgs, SIGVLP_ATTENTION_TABLES_ARGS,                             \
    "Per-call cos/sin tables of the fused attention (csrc/attention.cu).")                                  \
  L(attention_forward, AttentionArgs, SIGVLP_ATTENTION_ARGS,                                                \
    "Fused 3D-RoPE varlen flash attention, forward (csrc/attention.cu).")                                   \
  L(attention_backward, AttentionArgs, SIGVLP_ATTENTION_ARGS,                                               \
    "Fused 3D-RoPE varlen flash attention, backward (csrc/attention.cu).")
