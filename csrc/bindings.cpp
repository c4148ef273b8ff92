// nanobind module sigvlp._cuda: thin wrappers over the C++ launchers in launchers.h.
// Tensors arrive as raw device pointers (uintptr_t) with explicit shapes and strides, so the
// module never sees a torch type; sigvlp/ops validates every argument before calling here.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "launchers.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

void check(int code, const char* what) {
  if (code != 0) {
    throw std::runtime_error(std::string("sigvlp._cuda.") + what + ": " + sigvlp::error_string(code));
  }
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

NB_MODULE(_cuda, m) {
  m.doc() = "sigvlp CUDA kernels (no libtorch dependency; called from sigvlp.ops)";
  m.def("device_count", &sigvlp::device_count);
  m.def("runtime_version", &sigvlp::runtime_version);
  m.def("driver_version", &sigvlp::driver_version);
  m.def("compiled_arch_list", []() { return std::string(sigvlp::compiled_arch_list()); });
  m.def("check_kernel_image", [](int device) {
    const int code = sigvlp::check_kernel_image(device);
    return code == 0 ? std::string() : std::string(sigvlp::error_string(code));
  }, "device"_a, "Empty string when this module has a kernel image for the device, else the reason.");

  m.def(
      "rope3d",
      [](uintptr_t x, uintptr_t out, int dtype, int64_t total_tokens, int64_t nheads, int64_t head_dim,
         int64_t x_stride_token, int64_t x_stride_head, int64_t out_stride_token, int64_t out_stride_head,
         uintptr_t cu_seqlens, int64_t batch, uintptr_t grid_thw, uintptr_t positions, double log2_theta, int n_t,
         int n_h, int n_w, bool interleaved, bool inverse, uintptr_t stream) {
        sigvlp::Rope3dArgs a{};
        a.x = ptr<const void>(x);
        a.out = ptr<void>(out);
        a.dtype = static_cast<sigvlp::DType>(dtype);
        a.total_tokens = total_tokens;
        a.nheads = nheads;
        a.head_dim = head_dim;
        a.x_stride_token = x_stride_token;
        a.x_stride_head = x_stride_head;
        a.out_stride_token = out_stride_token;
        a.out_stride_head = out_stride_head;
        a.cu_seqlens = ptr<const int32_t>(cu_seqlens);
        a.batch = batch;
        a.grid_thw = ptr<const int32_t>(grid_thw);
        a.positions = ptr<const float>(positions);
        a.log2_theta = log2_theta;
        a.n_t = n_t;
        a.n_h = n_h;
        a.n_w = n_w;
        a.interleaved = interleaved;
        a.inverse = inverse;
        a.stream = ptr<void>(stream);
        check(sigvlp::rope3d(a), "rope3d");
      },
      "x"_a, "out"_a, "dtype"_a, "total_tokens"_a, "nheads"_a, "head_dim"_a, "x_stride_token"_a,
      "x_stride_head"_a, "out_stride_token"_a, "out_stride_head"_a, "cu_seqlens"_a, "batch"_a, "grid_thw"_a,
      "positions"_a, "log2_theta"_a, "n_t"_a, "n_h"_a, "n_w"_a, "interleaved"_a, "inverse"_a, "stream"_a);
  // ---- sigmoid_loss (csrc/sigmoid_loss.cu) ----
  m.def(
      "sigmoid_loss_pass",
      [](uintptr_t a, uintptr_t b, uintptr_t da, uintptr_t workspace, int64_t workspace_ld, uintptr_t partials,
         uintptr_t a_ids, uintptr_t b_ids, uintptr_t scale, uintptr_t bias, int dtype, int64_t na, int64_t nb,
         int64_t d, int64_t a_stride, int64_t b_stride, int64_t da_stride, float inv_norm, uintptr_t stream) {
        sigvlp::SigmoidLossPassArgs p{};
        p.a = ptr<const void>(a);
        p.b = ptr<const void>(b);
        p.da = ptr<void>(da);
        p.workspace = ptr<float>(workspace);
        p.workspace_ld = workspace_ld;
        p.partials = ptr<float>(partials);
        p.a_ids = ptr<const int64_t>(a_ids);
        p.b_ids = ptr<const int64_t>(b_ids);
        p.scale = ptr<const float>(scale);
        p.bias = ptr<const float>(bias);
        p.dtype = static_cast<sigvlp::DType>(dtype);
        p.na = na;
        p.nb = nb;
        p.d = d;
        p.a_stride = a_stride;
        p.b_stride = b_stride;
        p.da_stride = da_stride;
        p.inv_norm = inv_norm;
        p.stream = ptr<void>(stream);
        check(sigvlp::sigmoid_loss_pass(p), "sigmoid_loss_pass");
      },
      "a"_a, "b"_a, "da"_a, "workspace"_a, "workspace_ld"_a, "partials"_a, "a_ids"_a, "b_ids"_a, "scale"_a,
      "bias"_a, "dtype"_a, "na"_a, "nb"_a, "d"_a, "a_stride"_a, "b_stride"_a, "da_stride"_a, "inv_norm"_a,
      "stream"_a);
  // ---- end sigmoid_loss ----
  // ---- newton_schulz (csrc/newton_schulz.cu) ----
  m.def(
      "newton_schulz",
      [](uintptr_t x, uintptr_t out, int dtype, int64_t batch, int64_t rows, int64_t cols, int64_t out_stride_batch,
         int64_t out_stride_row, int64_t out_stride_col, uintptr_t inv_norm, nb::list coefficients, int steps,
         uintptr_t gram, uintptr_t poly, uintptr_t scratch0, uintptr_t scratch1, uintptr_t stream) {
        if (steps < 0 || nb::len(coefficients) != static_cast<size_t>(3 * steps)) {
          throw std::invalid_argument("sigvlp._cuda.newton_schulz: coefficients must hold 3 * steps floats");
        }
        std::vector<float> coeffs(3 * static_cast<size_t>(steps));
        for (size_t i = 0; i < nb::len(coefficients); ++i) coeffs[i] = nb::cast<float>(coefficients[i]);
        sigvlp::NewtonSchulzArgs a{};
        a.x = ptr<const void>(x);
        a.out = ptr<void>(out);
        a.dtype = static_cast<sigvlp::DType>(dtype);
        a.batch = batch;
        a.rows = rows;
        a.cols = cols;
        a.out_stride_batch = out_stride_batch;
        a.out_stride_row = out_stride_row;
        a.out_stride_col = out_stride_col;
        a.inv_norm = ptr<const float>(inv_norm);
        a.coefficients = coeffs.data();
        a.steps = steps;
        a.gram = ptr<void>(gram);
        a.poly = ptr<void>(poly);
        a.scratch0 = ptr<void>(scratch0);
        a.scratch1 = ptr<void>(scratch1);
        a.stream = ptr<void>(stream);
        check(sigvlp::newton_schulz(a), "newton_schulz");
      },
      "x"_a, "out"_a, "dtype"_a, "batch"_a, "rows"_a, "cols"_a, "out_stride_batch"_a, "out_stride_row"_a,
      "out_stride_col"_a, "inv_norm"_a, "coefficients"_a, "steps"_a, "gram"_a, "poly"_a, "scratch0"_a,
      "scratch1"_a, "stream"_a);
  // ---- end newton_schulz ----
}
