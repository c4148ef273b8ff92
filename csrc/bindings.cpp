// nanobind module sigvlp._cuda (and, compiled against csrc/emu, sigvlp._cuda_emu): thin wrappers
// over the C++ launchers in launchers.h. Tensors arrive as raw device pointers (uintptr_t) with
// explicit shapes and strides, so the module never sees a torch type; sigvlp/ops validates every
// argument before calling here.
//
// Each launcher's Args struct is declared once, as an X-macro list in launchers.h; from it each
// launcher in SIGVLP_LAUNCHERS gets its (keyword, member) fields here, and one generic binding turns
// the call's keyword arguments into the struct (pointers from integers, DType from its code) and
// refuses missing or unknown keywords by name. No launcher or argument is named in this file.
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
  m.doc() = "sigvlp CUDA kernels (no libtorch dependency; called from sigvlp.ops)";
  m.def("device_count", &sigvlp::device_count);
  m.def("runtime_version", &sigvlp::runtime_version);
  m.def("driver_version", &sigvlp::driver_version);
  m.def("compiled_arch_list", []() { return std::string(sigvlp::compiled_arch_list()); });
  m.def("check_kernel_image", [](int device) {
    const int code = sigvlp::check_kernel_image(device);
    return code == 0 ? std::string() : std::string(sigvlp::error_string(code));
  }, "device"_a, "Empty string when this module has a kernel image for the device, else the reason.");

  // Every launcher of launchers.h, its keyword arguments generated from its Args X-macro list.
  nb::dict fields;
#define SIGVLP_BIND_FIELD(type, name) , field(#name, &Args::name)
#define SIGVLP_BIND_HOST_FLOATS(name, count, per) , HostFloats<Args>{#name, &Args::name, &Args::count, per}
#define SIGVLP_FIELD_NAME(type, name) names.append(#name);
#define SIGVLP_HOST_FLOATS_NAME(name, count, per) names.append(#name);
#define SIGVLP_BIND(name, ArgsType, LIST, doc)                                              \
  {                                                                                         \
    using Args = sigvlp::ArgsType;                                                          \
    bind_launcher<Args>(m, #name, &sigvlp::name, doc LIST(SIGVLP_BIND_FIELD, SIGVLP_BIND_HOST_FLOATS)); \
    nb::list names;                                                                         \
    LIST(SIGVLP_FIELD_NAME, SIGVLP_HOST_FLOATS_NAME)                                        \
    fields[#name] = names;                                                                  \
  }
  SIGVLP_LAUNCHERS(SIGVLP_BIND)
#undef SIGVLP_BIND
#undef SIGVLP_HOST_FLOATS_NAME
#undef SIGVLP_FIELD_NAME
#undef SIGVLP_BIND_HOST_FLOATS
#undef SIGVLP_BIND_FIELD
  m.def("launcher_fields", [fields]() { return fields; },
        "{launcher name: [its keyword arguments, in declaration order]} (from csrc/launchers.h).");

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
