// The CPU kernel of `qtorch::linear_packed`: the forward of qtorch's quantized modules, run on
// the packed layout each module owns (qtorch/nn/linear.py), and its backward w.r.t. x.
//
//   qtorch::linear_packed(x [..., K] float, w0, w1, w2?, bias [N]?, layout, N, K, group_size)
//       -> [..., N] x.dtype
//   qtorch::linear_packed_grad_input(grad [..., N] float, w0, w1, w2?, layout, N, K,
//       group_size) -> [..., K] grad.dtype
//
// w0, w1, w2 are what the layout names (qtorch/backends/cpu.py registers the layouts; separate
// arguments rather than a Tensor[]: a list costs every call a conversion):
//   "cpu_w8a8"   [VNNI-packed weight (int8_mm.h), weight_scale f32 [N], smooth_scale f32 [K]?]
//                (the third only for SmoothQuant: x / smooth_scale is what gets quantized, in
//                the kernel's activation quantization, and the backward divides dx by it)
//   "cpu_w8a16"  [packed int8 weight, packed scale (weight_only.h)]
//   "cpu_w4a16"  [packed int4 weight, packed scale, packed zero (weight_only.h)]
// The schemas are defined in Python (qtorch/_packed.py), which also registers the fake
// impl, the autograd formula and the Python kernel that serves every other case.
//
// Backend choice, per call. Python (qtorch/_backend.py) owns the precedence (use_backend >
// set_backend > QTORCH_BACKEND > auto) and pushes its state here: set_backend's choice and how
// many use_backend scopes are open. This file asks one question of it, "does the cpu backend
// serve CPU tensors now?", and answers yes only when no scope is open and the process-wide
// choice (or, without one, QTORCH_BACKEND) is auto or cpu. Anything else (an open scope, any
// other backend, a bad QTORCH_BACKEND) goes to the Python kernel, which resolves the choice and
// raises the contract's errors. So C++ never decides what Python would decide differently.
//
// The eager fast path. A module call through the dispatcher costs several us, a large share of
// a decode-sized call. `fast_linear` is a plain C function the module calls first: for plain
// CPU tensors outside autograd, tracing and dispatch modes, with the cpu backend in force, it
// runs the same kernel and returns the result; otherwise it returns None and the module takes
// the op. It reads the module's packed tensors from the arguments: there is no table.
#include <torch/extension.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "bindings.h"
#include "kernels/int8_mm.h"
#include "kernels/weight_only.h"
#include "scratch.h"

namespace qtorch::cpu::packed {
namespace {

// ---------------------------------------------------------------- backend state (pushed)

// Codes of qtorch._backend.BACKENDS; kUnset: set_backend has not chosen (or was cleared).
enum Choice : int { kUnset = -1, kAuto = 0, kReference = 1, kCpu = 2, kTriton = 3, kCuda = 4 };
std::atomic<int> g_global{kUnset};
std::atomic<int> g_scopes{0};

bool cpu_in_force() {
  if (g_scopes.load(std::memory_order_relaxed) != 0) return false;
  const int g = g_global.load(std::memory_order_relaxed);
  if (g != kUnset) return g == kAuto || g == kCpu;
  const char* env = std::getenv("QTORCH_BACKEND");
  if (env == nullptr || *env == '\0') return true;
  return std::strcmp(env, "auto") == 0 || std::strcmp(env, "cpu") == 0;
}

// ---------------------------------------------------------------- layouts

enum Layout : int { kNone = -1, kW8A8 = 0, kW8A16 = 1, kW4A16 = 2 };

Layout layout_of(c10::string_view name) {
  if (name == "cpu_w8a8") return kW8A8;
  if (name == "cpu_w8a16") return kW8A16;
  if (name == "cpu_w4a16") return kW4A16;
  return kNone;
}

size_t tensors_of(Layout l) { return l == kW4A16 ? 3 : 2; }
// cpu_w8a8 takes a third tensor, SmoothQuant's smooth_scale, or not.
bool tensors_ok(Layout l, size_t n) { return n == tensors_of(l) || (l == kW8A8 && n == 3); }

// The packed tensors match the layout and the sizes (so every kernel access is in bounds).
void check_weights(Layout l, at::TensorList w, int64_t N, int64_t K, int64_t gs) {
  TORCH_CHECK_VALUE(tensors_ok(l, w.size()), "linear_packed: layout takes ", tensors_of(l),
                    " weight tensors, got ", w.size());
  for (const at::Tensor& t : w)
    TORCH_CHECK_VALUE(t.device().is_cpu(), "linear_packed: weights must be CPU tensors");
  switch (l) {
    case kW8A8:
      binding::check_int8_packed(w[0], N, K);
      TORCH_CHECK_VALUE(w[1].scalar_type() == at::kFloat && w[1].dim() == 1 && w[1].size(0) == N,
                        "weight_scale must be float32 [", N, "], got ", w[1].scalar_type(), " ",
                        w[1].sizes());
      if (w.size() == 3)
        TORCH_CHECK_VALUE(
            w[2].scalar_type() == at::kFloat && w[2].dim() == 1 && w[2].size(0) == K,
            "smooth_scale must be float32 [", K, "], got ", w[2].scalar_type(), " ", w[2].sizes());
      break;
    case kW8A16: binding::check_int8wo_packed(w[0], w[1], N, K); break;
    case kW4A16: binding::check_int4_packed(w[0], w[1], w[2], N, K, gs); break;
    default: TORCH_CHECK(false, "linear_packed: not a cpu layout");
  }
}

// x [M, K] -> [M, N] in x.dtype. The bias is cast to x.dtype first, then added in fp32 by the
// kernels, which is what the reference's `x @ ŵ.T + bias` in x.dtype rounds to.
at::Tensor run(Layout l, const at::Tensor& x, at::TensorList w, const std::optional<at::Tensor>& bias,
               int64_t N, int64_t K, int64_t gs) {
  std::optional<at::Tensor> b = bias;
  if (b.has_value() && b->scalar_type() != x.scalar_type()) b = b->to(x.scalar_type());
  switch (l) {
    case kW8A8:
      return binding::int8_linear(x, w[0], N, w[1], b,
                                  w.size() == 3 ? std::optional<at::Tensor>(w[2]) : std::nullopt);
    case kW8A16: return binding::int8_weight_only_linear(x, w[0], w[1], N, K, b);
    default: return binding::int4_weight_only_linear(x, w[0], w[1], w[2], N, K, gs, b);
  }
}

// grad [M, N] @ ŵ [N, K] in fp32 as the reference (grad widened exactly, ŵ dequantized with the
// reference's roundings, one fp32 GEMM, one rounding to grad.dtype). ŵ is never built whole:
// each task dequantizes a column slab ŵ[:, k0:k0+kc] from the packed layout into a per-task
// buffer and runs that slab's GEMM while it is cache-resident, so the module keeps one copy of
// its weight (the packed one) and a backward costs no [N, K] fp32 tensor.
// The int8 layouts' dequantizers write the slab transposed, ŵᵀ[k0:k1, :] as [kc, N] (their
// SIMD paths store whole vectors that way, int8_mm.h / weight_only.h), and BLAS gets the
// transposed view; the int4 one writes ŵ[:, k0:k1] as [N, kc].
at::Tensor grad_input(Layout l, const at::Tensor& grad, at::TensorList w, int64_t N, int64_t K,
                      int64_t gs) {
  const auto dt = grad.scalar_type();
  const at::Tensor g = qtorch::cpu::f32_contiguous(grad);
  const int64_t M = g.size(0);
  at::Tensor out = at::empty({M, K}, g.options());
  if (M == 0) return out.to(dt);
  // Narrow slabs keep the buffer in L2 while dequantizing dominates (small M); wider ones
  // give the GEMM a better shape once it dominates.
  const int64_t kc = std::min<int64_t>(K, M <= 32 ? 64 : M <= 256 ? 128 : 256);
  const int64_t slabs = (K + kc - 1) / kc;
  const bool transposed = l != kW4A16;
  at::parallel_for(0, slabs, 1, [&](int64_t c0, int64_t c1) {
    at::Tensor buf = transposed ? at::empty({kc, N}, g.options()) : at::empty({N, kc}, g.options());
    float* bp = buf.data_ptr<float>();
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k0 = c * kc, k1 = std::min(K, k0 + kc);
      switch (l) {
        case kW8A8:
          int8_mm::dequant_b_slab_t(w[0].data_ptr<uint8_t>(), w[1].data_ptr<float>(), N, K, k0,
                                    k1, bp, N);
          break;
        case kW8A16:
          weight_only::dequant_int8_slab_t(w[0].data_ptr<int8_t>(), w[1].data_ptr<float>(), N,
                                           K, k0, k1, bp, N);
          break;
        default:
          if (w[2].scalar_type() == at::kFloat)  // float zero points
            weight_only::dequant_int4_slab(w[0].data_ptr<uint8_t>(), w[1].data_ptr<float>(),
                                           w[2].data_ptr<float>(), N, K, gs, k0, k1, bp, kc);
          else
            weight_only::dequant_int4_slab(w[0].data_ptr<uint8_t>(), w[1].data_ptr<float>(),
                                           w[2].data_ptr<uint8_t>(), N, K, gs, k0, k1, bp, kc);
      }
      at::Tensor dst = out.narrow(1, k0, k1 - k0);
      at::mm_out(dst, g, transposed ? buf.narrow(0, 0, k1 - k0).t() : buf.narrow(1, 0, k1 - k0));
    }
  });
  // SmoothQuant: y = (x / s) ŵᵀ, so dx = (grad @ ŵ) / s (quantization straight-through).
  if (l == kW8A8 && w.size() == 3) out.div_(w[2]);
  return out.to(dt);
}

// Beyond this K an int32 dot product of int8 values can overflow; the op decides what happens.
constexpr int64_t kMaxExactK = ((int64_t(1) << 31) - 1) / (128 * 128);  // 131071

bool is_float(at::ScalarType s) { return s == at::kFloat || s == at::kHalf || s == at::kBFloat16; }

std::vector<int64_t> lead_shape(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> s(t.sizes().begin(), t.sizes().end() - 1);
  s.push_back(last);
  return s;
}

// ---------------------------------------------------------------- the op kernels

// The weight tensors as one list: w2 is absent for the two-tensor layouts.
std::vector<at::Tensor> weights(const at::Tensor& w0, const at::Tensor& w1,
                                const std::optional<at::Tensor>& w2) {
  std::vector<at::Tensor> w{w0, w1};
  if (w2.has_value()) w.push_back(*w2);
  return w;
}

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            c10::string_view, int64_t, int64_t, int64_t);
using GradFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const std::optional<at::Tensor>&, c10::string_view, int64_t, int64_t,
                          int64_t);

// The kernels on a cpu layout, whatever backend is in force (qtorch_cpu::linear_packed*: the
// Python kernel calls them when a use_backend("cpu") scope is open).
at::Tensor linear_packed_cpu(const at::Tensor& x, const at::Tensor& w0, const at::Tensor& w1,
                             const std::optional<at::Tensor>& w2,
                             const std::optional<at::Tensor>& bias, c10::string_view layout,
                             int64_t N, int64_t K, int64_t gs) {
  const Layout l = layout_of(layout);
  TORCH_CHECK_VALUE(l != kNone, "linear_packed: ", layout, " is not a cpu layout");
  TORCH_CHECK_TYPE(is_float(x.scalar_type()), "x must have dtype in (float32, float16, ",
                   "bfloat16), got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, "x [..., K] must have K = in_features = ",
                    K, ", got x ", x.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be a CPU tensor for layout ", layout);
  const std::vector<at::Tensor> w = weights(w0, w1, w2);
  check_weights(l, w, N, K, gs);
  if (bias.has_value())
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must have shape (", N,
                      ",), got ", bias->sizes());
  if (x.dim() == 2) {
    if (x.size(0) == 0) return at::empty({0, N}, x.options());
    return run(l, x, w, bias, N, K, gs);
  }
  const std::vector<int64_t> shape = lead_shape(x, N);
  if (x.numel() == 0) return at::empty(shape, x.options());
  return run(l, x.reshape({-1, K}), w, bias, N, K, gs).view(shape);
}

at::Tensor linear_packed_grad_input_cpu(const at::Tensor& grad, const at::Tensor& w0,
                                        const at::Tensor& w1, const std::optional<at::Tensor>& w2,
                                        c10::string_view layout, int64_t N, int64_t K,
                                        int64_t gs) {
  const Layout l = layout_of(layout);
  TORCH_CHECK_VALUE(l != kNone, "linear_packed_grad_input: ", layout, " is not a cpu layout");
  TORCH_CHECK_TYPE(is_float(grad.scalar_type()), "grad must be float32, float16 or bfloat16, got ",
                   grad.scalar_type());
  TORCH_CHECK_VALUE(grad.dim() >= 1 && grad.size(-1) == N, "grad [..., N] must have N = ", N,
                    ", got ", grad.sizes());
  const std::vector<at::Tensor> w = weights(w0, w1, w2);
  check_weights(l, w, N, K, gs);
  const std::vector<int64_t> shape = lead_shape(grad, K);
  if (grad.numel() == 0) return at::zeros(shape, grad.options());
  return grad_input(l, grad.reshape({-1, N}), w, N, K, gs).view(shape);
}

// qtorch::linear_packed* on CPU: the kernels above when the cpu backend is in force and the
// layout is a cpu one; the Python kernel (qtorch/_packed.py) otherwise.
at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& w0, const at::Tensor& w1,
                         const std::optional<at::Tensor>& w2,
                         const std::optional<at::Tensor>& bias, c10::string_view layout,
                         int64_t N, int64_t K, int64_t gs) {
  if (layout_of(layout) == kNone || !cpu_in_force()) {
    static auto python = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qtorch::_linear_packed_python", "")
                             .typed<LinearFn>();
    return python.call(x, w0, w1, w2, bias, layout, N, K, gs);
  }
  return linear_packed_cpu(x, w0, w1, w2, bias, layout, N, K, gs);
}

at::Tensor linear_packed_grad_input(const at::Tensor& grad, const at::Tensor& w0,
                                    const at::Tensor& w1, const std::optional<at::Tensor>& w2,
                                    c10::string_view layout, int64_t N, int64_t K, int64_t gs) {
  if (layout_of(layout) == kNone || !cpu_in_force()) {
    static auto python = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qtorch::_linear_packed_grad_input_python", "")
                             .typed<GradFn>();
    return python.call(grad, w0, w1, w2, layout, N, K, gs);
  }
  return linear_packed_grad_input_cpu(grad, w0, w1, w2, layout, N, K, gs);
}

// ---------------------------------------------------------------- the eager fast path

c10::DispatchKeySet g_plain_keys, g_inference_keys;

// `o` is a plain (not subclassed, not wrapped by functorch / functionalization) dense CPU
// tensor that autograd need not see. Returns it, or null.
const at::Tensor* plain(PyObject* o) {
  if (o == nullptr || !THPVariable_CheckExact(o)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(o);
  const c10::DispatchKeySet ks = t.key_set();
  if (ks != g_plain_keys && ks != g_inference_keys) return nullptr;
  if (t.requires_grad() && at::GradMode::is_enabled()) return nullptr;
  return &t;
}

// fast_linear(x, layout_code, N, K, group_size, bias, w0, w1, w2=None): the module's packed
// call, or None (the caller then calls the op, which checks, raises and serves every case).
PyObject* fast_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs < 8 || nargs > 9) Py_RETURN_NONE;
  if (c10::impl::TorchDispatchModeTLS::any_modes_set() || at::impl::torch_function_mode_enabled() ||
      torch::jit::tracer::isTracing() || !cpu_in_force())
    Py_RETURN_NONE;
  const long code = PyLong_AsLong(args[1]);
  const int64_t N = PyLong_AsLongLong(args[2]), K = PyLong_AsLongLong(args[3]),
                gs = PyLong_AsLongLong(args[4]);
  if (PyErr_Occurred()) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  if (code < kW8A8 || code > kW4A16) Py_RETURN_NONE;
  const Layout l = Layout(code);
  const at::Tensor* x = plain(args[0]);
  if (x == nullptr || !is_float(x->scalar_type()) || x->dim() < 1 || x->numel() == 0 ||
      x->size(-1) != K)
    Py_RETURN_NONE;
  std::optional<at::Tensor> bias;
  if (args[5] != Py_None) {
    const at::Tensor* b = plain(args[5]);
    if (b == nullptr || !is_float(b->scalar_type()) || b->dim() != 1 || b->size(0) != N)
      Py_RETURN_NONE;
    bias = *b;
  }
  // Own references: the kernel runs without the GIL, while another thread could drop the
  // module's buffers.
  std::vector<at::Tensor> w;
  const size_t given = size_t(nargs) - 6;
  if (!tensors_ok(l, given)) Py_RETURN_NONE;
  for (size_t i = 0; i < given; ++i) {
    const at::Tensor* t = plain(args[6 + i]);
    if (t == nullptr) Py_RETURN_NONE;
    w.push_back(*t);
  }
  try {
    check_weights(l, w, N, K, gs);
  } catch (const c10::Error&) {
    Py_RETURN_NONE;  // the op raises it, named
  }
  const at::Tensor xt = *x;
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    const std::vector<int64_t> shape = lead_shape(xt, N);
    out = run(l, xt.dim() == 2 ? xt : xt.reshape({-1, K}), w, bias, N, K, gs);
    if (xt.dim() != 2) out = out.view(shape);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// ---- the public linear ops' fast path (qtorch.ops.int8_linear, int8_weight_only_linear,
// int4_weight_only_linear): the same eager conditions, the weight packed for this call only.

bool plain_eager_state() {
  return !c10::impl::TorchDispatchModeTLS::any_modes_set() &&
         !at::impl::torch_function_mode_enabled() && !torch::jit::tracer::isTracing();
}

// METH_FASTCALL | METH_KEYWORDS argument parsing into `out` (n parameters, by position or by
// name). False (the caller returns None) on too many arguments, unknown or repeated names.
bool parse(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames, const char* const* names,
           int n, PyObject** out) {
  for (int i = 0; i < n; ++i) out[i] = nullptr;
  if (nargs > n) return false;
  for (Py_ssize_t i = 0; i < nargs; ++i) out[i] = args[i];
  const Py_ssize_t nk = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
  for (Py_ssize_t j = 0; j < nk; ++j) {
    PyObject* name = PyTuple_GET_ITEM(kwnames, j);
    int idx = -1;
    for (int i = 0; i < n && idx < 0; ++i)
      if (PyUnicode_CompareWithASCIIString(name, names[i]) == 0) idx = i;
    if (idx < 0 || out[idx] != nullptr) return false;
    out[idx] = args[nargs + j];
  }
  return true;
}

// Optional bias: null/None -> no bias, a plain float [N] tensor -> it (cast to x.dtype, as the
// Python path does), else not ok.
bool parse_bias(PyObject* o, int64_t N, const at::Tensor& x, std::optional<at::Tensor>& bias) {
  if (o == nullptr || o == Py_None) return true;
  const at::Tensor* b = plain(o);
  if (b == nullptr || !is_float(b->scalar_type()) || b->dim() != 1 || b->size(0) != N)
    return false;
  bias = b->scalar_type() == x.scalar_type() ? *b : b->to(x.scalar_type());
  return true;
}

PyObject* finish(at::Tensor out, const at::Tensor& x, int64_t N) {
  if (x.dim() != 2) out = out.view(lead_shape(x, N));
  return THPVariable_Wrap(std::move(out));
}

const char* const kInt8Names[] = {"x", "w_q", "w_scale", "bias"};

template <bool kW8A8>
PyObject* fast_int8(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  HANDLE_TH_ERRORS
  PyObject* a[4];
  if (!parse(args, nargs, kwnames, kInt8Names, 4, a) || a[2] == nullptr) Py_RETURN_NONE;
  if (!plain_eager_state() || !cpu_in_force()) Py_RETURN_NONE;
  const at::Tensor *x = plain(a[0]), *w = plain(a[1]), *s = plain(a[2]);
  if (x == nullptr || w == nullptr || s == nullptr) Py_RETURN_NONE;
  if (!is_float(x->scalar_type()) || x->dim() < 1 || x->numel() == 0) Py_RETURN_NONE;
  if (w->scalar_type() != at::kChar || w->dim() != 2) Py_RETURN_NONE;
  const int64_t N = w->size(0), K = w->size(1);
  if (N <= 0 || K <= 0 || x->size(-1) != K || K > kMaxExactK) Py_RETURN_NONE;
  if (s->scalar_type() != at::kFloat || s->dim() != 1 || s->size(0) != N) Py_RETURN_NONE;
  std::optional<at::Tensor> bias;
  if (!parse_bias(a[3], N, *x, bias)) Py_RETURN_NONE;
  const at::Tensor xt = *x, wt = *w, st = *s;  // own references: the GIL is released below
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    const at::Tensor x2 = xt.dim() == 2 ? xt : xt.reshape({-1, K});
    out = kW8A8 ? binding::int8_linear_canonical(x2, wt, st, bias)
                : binding::int8_weight_only_linear_canonical(x2, wt, st, bias);
  }
  return finish(std::move(out), xt, N);
  END_HANDLE_TH_ERRORS
}

PyObject* fast_int8_linear(PyObject* m, PyObject* const* args, Py_ssize_t nargs, PyObject* kw) {
  return fast_int8<true>(m, args, nargs, kw);
}
PyObject* fast_int8_weight_only_linear(PyObject* m, PyObject* const* args, Py_ssize_t nargs,
                                       PyObject* kw) {
  return fast_int8<false>(m, args, nargs, kw);
}

const char* const kInt4Names[] = {"x", "qweight", "scales", "zeros", "group_size", "bias"};

PyObject* fast_int4_weight_only_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs,
                                       PyObject* kwnames) {
  HANDLE_TH_ERRORS
  PyObject* a[6];
  if (!parse(args, nargs, kwnames, kInt4Names, 6, a) || a[4] == nullptr) Py_RETURN_NONE;
  if (!PyLong_CheckExact(a[4])) Py_RETURN_NONE;  // bool and other ints: the Python path
  const long gs = PyLong_AsLong(a[4]);
  if (gs == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  if (gs != 32 && gs != 64 && gs != 128 && gs != 256) Py_RETURN_NONE;
  if (!plain_eager_state() || !cpu_in_force()) Py_RETURN_NONE;
  const at::Tensor *x = plain(a[0]), *q = plain(a[1]), *sc = plain(a[2]), *z = plain(a[3]);
  if (x == nullptr || q == nullptr || sc == nullptr || z == nullptr) Py_RETURN_NONE;
  if (!is_float(x->scalar_type()) || x->dim() < 1 || x->numel() == 0) Py_RETURN_NONE;
  if (q->scalar_type() != at::kByte || q->dim() != 2) Py_RETURN_NONE;
  const int64_t N = q->size(0), K = 2 * q->size(1);
  if (N <= 0 || K <= 0 || K % gs != 0 || x->size(-1) != K) Py_RETURN_NONE;
  const int64_t G = K / gs;
  if (sc->scalar_type() != at::kFloat || sc->dim() != 2 || sc->size(0) != N || sc->size(1) != G)
    Py_RETURN_NONE;
  if ((z->scalar_type() != at::kByte && z->scalar_type() != at::kFloat) || z->dim() != 2 ||
      z->size(0) != N || z->size(1) != G)
    Py_RETURN_NONE;
  std::optional<at::Tensor> bias;
  if (!parse_bias(a[5], N, *x, bias)) Py_RETURN_NONE;
  const at::Tensor xt = *x, qt = *q, st = *sc, zt = *z;
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    const at::Tensor x2 = xt.dim() == 2 ? xt : xt.reshape({-1, K});
    out = binding::int4_weight_only_linear_canonical(x2, qt, st, zt, gs, bias);
  }
  return finish(std::move(out), xt, N);
  END_HANDLE_TH_ERRORS
}

template <class F>
PyCFunction c_function(F* f) {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f));
}

PyMethodDef kMethods[] = {
    {"fast_linear", c_function(&fast_linear), METH_FASTCALL,
     "fast_linear(x, layout_code, N, K, group_size, bias, w0, w1, w2=None): a quantized "
     "module's call on its packed weights on the eager fast path, or None"},
    {"fast_int8_linear", c_function(&fast_int8_linear), METH_FASTCALL | METH_KEYWORDS,
     "int8_linear(x, w_q, w_scale, bias=None) on the eager fast path, or None"},
    {"fast_int8_weight_only_linear", c_function(&fast_int8_weight_only_linear),
     METH_FASTCALL | METH_KEYWORDS,
     "int8_weight_only_linear(x, w_q, w_scale, bias=None) on the eager fast path, or None"},
    {"fast_int4_weight_only_linear", c_function(&fast_int4_weight_only_linear),
     METH_FASTCALL | METH_KEYWORDS,
     "int4_weight_only_linear(x, qweight, scales, zeros, group_size, bias=None) on the eager "
     "fast path, or None"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

void register_python(pybind11::module_& m) {
  g_plain_keys = at::empty({1}).key_set();
  {
    c10::InferenceMode guard;
    g_inference_keys = at::empty({1}).key_set();
  }
  if (PyModule_AddFunctions(m.ptr(), kMethods) < 0) throw pybind11::error_already_set();
  m.def(
      "set_backend_choice", [](int64_t code) { g_global.store(int(code)); },
      "qtorch._backend pushes set_backend's choice (-1: none, 0 auto, 1 reference, 2 cpu, "
      "3 triton, 4 cuda)");
  m.def(
      "backend_scopes", [](int64_t delta) { return int64_t(g_scopes.fetch_add(int(delta)) + delta); },
      "qtorch._backend counts the open use_backend scopes (+1 on enter, -1 on exit)");
  m.def(
      "cpu_backend_in_force", []() { return cpu_in_force(); },
      "whether the C++ paths run CPU tensors on the cpu backend now (tests)");
  m.def(
      "use_counts",
      [](const at::Tensor& t) {
        // use_count() includes the reference this call's argument holds.
        return std::make_pair(int64_t(t.use_count()) - 1, int64_t(t.storage().use_count()));
      },
      "(references to t's TensorImpl, references to its storage), not counting this call's: "
      "a quantized module drops its canonical buffers only when nothing else holds them");
}

}  // namespace qtorch::cpu::packed

TORCH_LIBRARY_FRAGMENT(qtorch_cpu, m) {
  m.def("linear_packed(Tensor x, Tensor w0, Tensor w1, Tensor? w2, Tensor? bias, str layout, "
        "int N, int K, int group_size) -> Tensor");
  m.def("linear_packed_grad_input(Tensor grad, Tensor w0, Tensor w1, Tensor? w2, str layout, "
        "int N, int K, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(qtorch_cpu, CPU, m) {
  m.impl("linear_packed", &qtorch::cpu::packed::linear_packed_cpu);
  m.impl("linear_packed_grad_input", &qtorch::cpu::packed::linear_packed_grad_input_cpu);
}

TORCH_LIBRARY_IMPL(qtorch, CPU, m) {
  m.impl("linear_packed", &qtorch::cpu::packed::linear_packed);
  m.impl("linear_packed_grad_input", &qtorch::cpu::packed::linear_packed_grad_input);
}

// The C shim of qtorch::linear_packed for AOTInductor and Inductor's C++ wrapper, which call
// it directly instead of through their generic custom-op path (a boxed call per layer that,
// at decode sizes, costs more than the kernel). qtorch.inductor_options() names it.
extern "C" AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_linear_packed(
    AtenTensorHandle x, AtenTensorHandle w0, AtenTensorHandle w1, AtenTensorHandle* w2,
    AtenTensorHandle* bias, const char* layout, int64_t N, int64_t K, int64_t group_size,
    AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    namespace ai = torch::aot_inductor;
    at::Tensor out = qtorch::cpu::packed::linear_packed(
        *ai::tensor_handle_to_tensor_pointer(x), *ai::tensor_handle_to_tensor_pointer(w0),
        *ai::tensor_handle_to_tensor_pointer(w1), ai::pointer_to_optional<at::Tensor>(w2),
        ai::pointer_to_optional<at::Tensor>(bias), layout, N, K, group_size);
    *ret0 = ai::new_tensor_handle(std::move(out));
  });
}
