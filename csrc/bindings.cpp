// nanobind module sigvlp._cuda (and, compiled against csrc/emu, sigvlp._cuda_emu): thin wrappers
// over the C++ launchers in launchers.h. Tensors arrive as raw device pointers (uintptr_t) with
// explicit shapes and strides, so the module never sees a torch type; sigvlp/ops validates every
// argument before calling here.
//
// Each launcher's Args struct is described once, as a list of (keyword, member) fields; one
// generic binding turns the call's keyword arguments into the struct (pointers from integers,
// DType from its code), and refuses missing or unknown keywords by name.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "launchers.h"

#ifdef SIGVLP_EMU
#include "emu/sigvlp_emu.h"
#endif

#ifndef SIGVLP_MODULE_NAME
#define SIGVLP_MODULE_NAME _cuda
#endif
#define SIGVLP_STR2(x) #x
#define SIGVLP_STR(x) SIGVLP_STR2(x)

namespace nb = nanobind;
using namespace nb::literals;

namespace {

const std::string kModule = "sigvlp." SIGVLP_STR(SIGVLP_MODULE_NAME);

void check(int code, const char* what) {
  if (code != 0) {
    std::string message = kModule + "." + what + ": " + sigvlp::error_string(code);
#ifdef SIGVLP_EMU
    const std::string detail = sigvlp_emu::last_error_message();
    if (!detail.empty()) message += " (" + detail + ")";
    sigvlp_emu::set_last_error(0, "");
#endif
    throw std::runtime_error(message);
  }
}

// A struct member bound to a keyword argument.
template <typename S, typename M>
struct Field {
  const char* name;
  M S::*member;
};
template <typename S, typename M>
constexpr Field<S, M> field(const char* name, M S::*member) {
  return {name, member};
}
// A host float array (a Python sequence of floats) whose length is checked against another
// field: the struct gets a pointer into storage owned by the call.
template <typename S>
struct HostFloats {
  const char* name;
  const float* S::*member;
  int32_t S::*count_member;
  int per_count;
};

template <typename M>
M convert(const char* fn, const char* name, nb::handle value) {
  try {
    if constexpr (std::is_pointer<M>::value) {
      return reinterpret_cast<M>(nb::cast<uintptr_t>(value));
    } else if constexpr (std::is_same<M, sigvlp::DType>::value) {
      const int code = nb::cast<int>(value);
      if (code < 0 || code > 2) throw std::invalid_argument("bad dtype code");
      return static_cast<sigvlp::DType>(code);
    } else {
      return nb::cast<M>(value);
    }
  } catch (const std::exception&) {
    throw nb::type_error((kModule + "." + fn + ": argument " + name + " has the wrong type").c_str());
  }
}

template <typename S>
struct Filler {
  const char* fn;
  nb::kwargs& kwargs;
  S& args;
  std::vector<float>& host_floats;
  size_t used = 0;

  nb::handle take(const char* name) {
    if (!kwargs.contains(name)) {
      throw nb::type_error((kModule + "." + fn + ": missing keyword argument " + name).c_str());
    }
    ++used;
    return kwargs[name];
  }
  template <typename M>
  void operator()(const Field<S, M>& f) {
    args.*(f.member) = convert<M>(fn, f.name, take(f.name));
  }
  void operator()(const HostFloats<S>& f) {
    nb::handle seq = take(f.name);
    for (nb::handle v : seq) host_floats.push_back(nb::cast<float>(v));
    args.*(f.member) = host_floats.data();
  }
  void finish(const HostFloats<S>& f) {
    const int32_t count = args.*(f.count_member);
    if (count < 0 || host_floats.size() != static_cast<size_t>(count) * f.per_count) {
      throw std::invalid_argument(kModule + "." + fn + ": " + f.name + " must hold " + std::to_string(f.per_count) +
                                  " floats per step");
    }
  }
  template <typename M>
  void finish(const Field<S, M>&) {}
};

template <typename S, typename... F>
void bind_launcher(nb::module_& m, const char* name, int (*launcher)(const S&), const char* doc, F... fields) {
  std::string sig_doc = std::string(doc) + "\n\nKeyword arguments:";
  ((sig_doc += std::string(" ") + fields.name), ...);
  m.def(
      name,
      [name, launcher, fields...](nb::kwargs kwargs) {
        S args{};
        std::vector<float> host_floats;
        Filler<S> fill{name, kwargs, args, host_floats};
        (fill(fields), ...);
        (fill.finish(fields), ...);
        if (fill.used != nb::len(kwargs)) {
          for (auto item : kwargs) {
            const std::string key = nb::cast<std::string>(item.first);
            bool known = false;
            ((known = known || key == fields.name), ...);
            if (!known) throw nb::type_error((kModule + "." + name + ": unexpected keyword argument " + key).c_str());
          }
        }
        check(launcher(args), name);
      },
      sig_doc.c_str());
}

}  // namespace

NB_MODULE(SIGVLP_MODULE_NAME, m) {
  using sigvlp::NewtonSchulzArgs;
  using sigvlp::Rope3dArgs;
  using sigvlp::SigmoidLossPassArgs;
  m.doc() = "sigvlp CUDA kernels (no libtorch dependency; called from sigvlp.ops)";
  m.def("device_count", &sigvlp::device_count);
  m.def("runtime_version", &sigvlp::runtime_version);
  m.def("driver_version", &sigvlp::driver_version);
  m.def("compiled_arch_list", []() { return std::string(sigvlp::compiled_arch_list()); });
  m.def("check_kernel_image", [](int device) {
    const int code = sigvlp::check_kernel_image(device);
    return code == 0 ? std::string() : std::string(sigvlp::error_string(code));
  }, "device"_a, "Empty string when this module has a kernel image for the device, else the reason.");

  bind_launcher<Rope3dArgs>(
      m, "rope3d", &sigvlp::rope3d, "3D RoPE over varlen packed sequences (csrc/rope.cu).",
      field("x", &Rope3dArgs::x), field("out", &Rope3dArgs::out), field("dtype", &Rope3dArgs::dtype),
      field("total_tokens", &Rope3dArgs::total_tokens), field("nheads", &Rope3dArgs::nheads),
      field("head_dim", &Rope3dArgs::head_dim), field("x_stride_token", &Rope3dArgs::x_stride_token),
      field("x_stride_head", &Rope3dArgs::x_stride_head), field("out_stride_token", &Rope3dArgs::out_stride_token),
      field("out_stride_head", &Rope3dArgs::out_stride_head), field("cu_seqlens", &Rope3dArgs::cu_seqlens),
      field("batch", &Rope3dArgs::batch), field("grid_thw", &Rope3dArgs::grid_thw),
      field("positions", &Rope3dArgs::positions), field("log2_theta", &Rope3dArgs::log2_theta),
      field("n_t", &Rope3dArgs::n_t), field("n_h", &Rope3dArgs::n_h), field("n_w", &Rope3dArgs::n_w),
      field("interleaved", &Rope3dArgs::interleaved), field("inverse", &Rope3dArgs::inverse),
      field("stream", &Rope3dArgs::stream));
  // ---- sigmoid_loss (csrc/sigmoid_loss.cu) ----
  bind_launcher<SigmoidLossPassArgs>(
      m, "sigmoid_loss_pass", &sigvlp::sigmoid_loss_pass, "One blockwise sigmoid-loss pass (csrc/sigmoid_loss.cu).",
      field("a", &SigmoidLossPassArgs::a), field("b", &SigmoidLossPassArgs::b), field("da", &SigmoidLossPassArgs::da),
      field("workspace", &SigmoidLossPassArgs::workspace), field("workspace_ld", &SigmoidLossPassArgs::workspace_ld),
      field("partials", &SigmoidLossPassArgs::partials), field("a_ids", &SigmoidLossPassArgs::a_ids),
      field("b_ids", &SigmoidLossPassArgs::b_ids), field("scale", &SigmoidLossPassArgs::scale),
      field("bias", &SigmoidLossPassArgs::bias), field("dtype", &SigmoidLossPassArgs::dtype),
      field("na", &SigmoidLossPassArgs::na), field("nb", &SigmoidLossPassArgs::nb), field("d", &SigmoidLossPassArgs::d),
      field("a_stride", &SigmoidLossPassArgs::a_stride), field("b_stride", &SigmoidLossPassArgs::b_stride),
      field("da_stride", &SigmoidLossPassArgs::da_stride), field("inv_norm", &SigmoidLossPassArgs::inv_norm),
      field("stream", &SigmoidLossPassArgs::stream));
  // ---- end sigmoid_loss ----
  // ---- newton_schulz (csrc/newton_schulz.cu) ----
  bind_launcher<NewtonSchulzArgs>(
      m, "newton_schulz", &sigvlp::newton_schulz, "Batched Newton-Schulz iterations (csrc/newton_schulz.cu).",
      field("x", &NewtonSchulzArgs::x), field("out", &NewtonSchulzArgs::out), field("dtype", &NewtonSchulzArgs::dtype),
      field("batch", &NewtonSchulzArgs::batch), field("rows", &NewtonSchulzArgs::rows),
      field("cols", &NewtonSchulzArgs::cols), field("out_stride_batch", &NewtonSchulzArgs::out_stride_batch),
      field("out_stride_row", &NewtonSchulzArgs::out_stride_row),
      field("out_stride_col", &NewtonSchulzArgs::out_stride_col), field("inv_norm", &NewtonSchulzArgs::inv_norm),
      field("steps", &NewtonSchulzArgs::steps),
      HostFloats<NewtonSchulzArgs>{"coefficients", &NewtonSchulzArgs::coefficients, &NewtonSchulzArgs::steps, 3},
      field("gram", &NewtonSchulzArgs::gram), field("poly", &NewtonSchulzArgs::poly),
      field("scratch0", &NewtonSchulzArgs::scratch0), field("scratch1", &NewtonSchulzArgs::scratch1),
      field("stream", &NewtonSchulzArgs::stream));
  // ---- end newton_schulz ----
  // ---- attention (csrc/attention.cu) ----
  using sigvlp::AttentionArgs;
  using sigvlp::AttentionTablesArgs;
  bind_launcher<AttentionTablesArgs>(
      m, "attention_rotary_tables", &sigvlp::attention_rotary_tables,
      "Per-call cos/sin tables of the fused attention (csrc/attention.cu).",
      field("cos", &AttentionTablesArgs::cos), field("sin", &AttentionTablesArgs::sin),
      field("rows", &AttentionTablesArgs::rows), field("head_dim", &AttentionTablesArgs::head_dim),
      field("positions", &AttentionTablesArgs::positions), field("log2_theta", &AttentionTablesArgs::log2_theta),
      field("n_t", &AttentionTablesArgs::n_t), field("n_h", &AttentionTablesArgs::n_h),
      field("n_w", &AttentionTablesArgs::n_w), field("stream", &AttentionTablesArgs::stream));
#define SIGVLP_ATTENTION_FIELDS                                                                                     \
  field("dtype", &AttentionArgs::dtype), field("q", &AttentionArgs::q), field("k", &AttentionArgs::k),             \
      field("v", &AttentionArgs::v), field("out", &AttentionArgs::out), field("lse", &AttentionArgs::lse),         \
      field("dout", &AttentionArgs::dout), field("dlse", &AttentionArgs::dlse), field("delta", &AttentionArgs::delta), \
      field("dq", &AttentionArgs::dq), field("dk", &AttentionArgs::dk), field("dv", &AttentionArgs::dv),           \
      field("total_q", &AttentionArgs::total_q), field("total_k", &AttentionArgs::total_k),                         \
      field("nheads", &AttentionArgs::nheads), field("nheads_kv", &AttentionArgs::nheads_kv),                       \
      field("head_dim", &AttentionArgs::head_dim), field("batch", &AttentionArgs::batch),                           \
      field("max_q", &AttentionArgs::max_q), field("max_k", &AttentionArgs::max_k),                                 \
      field("q_stride_token", &AttentionArgs::q_stride_token), field("q_stride_head", &AttentionArgs::q_stride_head), \
      field("k_stride_token", &AttentionArgs::k_stride_token), field("k_stride_head", &AttentionArgs::k_stride_head), \
      field("v_stride_token", &AttentionArgs::v_stride_token), field("v_stride_head", &AttentionArgs::v_stride_head), \
      field("out_stride_token", &AttentionArgs::out_stride_token),                                                  \
      field("out_stride_head", &AttentionArgs::out_stride_head),                                                    \
      field("dout_stride_token", &AttentionArgs::dout_stride_token),                                                \
      field("dout_stride_head", &AttentionArgs::dout_stride_head),                                                  \
      field("dq_stride_token", &AttentionArgs::dq_stride_token), field("dq_stride_head", &AttentionArgs::dq_stride_head), \
      field("dk_stride_token", &AttentionArgs::dk_stride_token), field("dk_stride_head", &AttentionArgs::dk_stride_head), \
      field("dv_stride_token", &AttentionArgs::dv_stride_token), field("dv_stride_head", &AttentionArgs::dv_stride_head), \
      field("lse_stride_head", &AttentionArgs::lse_stride_head),                                                    \
      field("dlse_stride_head", &AttentionArgs::dlse_stride_head), field("cu_q", &AttentionArgs::cu_q),             \
      field("cu_k", &AttentionArgs::cu_k), field("grid_q", &AttentionArgs::grid_q), field("grid_k", &AttentionArgs::grid_k), \
      field("cos_q", &AttentionArgs::cos_q), field("sin_q", &AttentionArgs::sin_q), field("cos_k", &AttentionArgs::cos_k), \
      field("sin_k", &AttentionArgs::sin_k), field("rows_q", &AttentionArgs::rows_q), field("rows_k", &AttentionArgs::rows_k), \
      field("rotate", &AttentionArgs::rotate), field("positions_q", &AttentionArgs::positions_q),                   \
      field("positions_k", &AttentionArgs::positions_k), field("interleaved", &AttentionArgs::interleaved),         \
      field("causal", &AttentionArgs::causal), field("n_t", &AttentionArgs::n_t), field("n_h", &AttentionArgs::n_h), \
      field("softmax_scale", &AttentionArgs::softmax_scale), field("stream", &AttentionArgs::stream)
  bind_launcher<AttentionArgs>(m, "attention_forward", &sigvlp::attention_forward,
                               "Fused 3D-RoPE varlen flash attention, forward (csrc/attention.cu).",
                               SIGVLP_ATTENTION_FIELDS);
  bind_launcher<AttentionArgs>(m, "attention_backward", &sigvlp::attention_backward,
                               "Fused 3D-RoPE varlen flash attention, backward (csrc/attention.cu).",
                               SIGVLP_ATTENTION_FIELDS);
#undef SIGVLP_ATTENTION_FIELDS
  // ---- end attention ----

#ifdef SIGVLP_EMU
  // ---- emulation controls (sigvlp._cuda_emu only) ----
  m.attr("emulated") = true;
  m.def("sanitizer", []() { return std::string(sigvlp_emu::sanitizer()); });
  m.def("schedule", []() { return std::string(sigvlp_emu::schedule_name()); });
  m.def("set_schedule", [](const std::string& spec) {
    if (!sigvlp_emu::set_schedule(spec.c_str()))
      throw std::invalid_argument("schedule: expected 'forward', 'reversed' or 'shuffle:SEED', got '" + spec + "'");
  }, "spec"_a);
  m.def("workers", []() { return sigvlp_emu::config().workers; });
  m.def("set_workers", [](int n) { sigvlp_emu::config().workers = n < 1 ? 1 : n; }, "n"_a);
  m.def("max_grid_y", []() { return sigvlp_emu::config().max_grid_y; });
  m.def("set_max_grid_y", [](int64_t n) {
    if (n < 1 || n > 65535) throw std::invalid_argument("max_grid_y: expected 1..65535");
    sigvlp_emu::config().max_grid_y = n;
  }, "n"_a);
  m.def("sm_count", []() { return sigvlp_emu::config().sm_count; });
#else
  m.attr("emulated") = false;
#endif
}
