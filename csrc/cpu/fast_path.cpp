// Eager fast path of the public linear ops (qtorch.ops.int8_linear, int8_weight_only_linear,
// int4_weight_only_linear) for plain CPU tensors.
//
// Why. Through Python, a linear call walks ~15 Python functions (argument checks, backend
// choice, the packed-weight cache, the dispatcher) before the kernel runs. In a tight loop that
// is ~15 us, but in a real decode step the weights of the previous layers have just streamed
// through the caches, so the interpreter's objects are cold and the same walk costs
// ~150-200 us, a third of a whole W8A8 call at M = 1, K = N = 4096. Here one C call does the
// common case: it recognises a valid call on plain CPU tensors with the cpu backend in force
// and a weight that the Python path has already packed, and runs the kernel binding directly.
// Anything else (first call on a weight, autograd, tensor subclasses, modes, tracing, another
// backend, odd arguments, invalid input) returns None and the caller takes the full Python
// path, which checks, raises the contract's errors, packs, and registers the packed weight
// here (`_fast_put`). So the fast path never changes a result, only the cost of reaching it.
//
// Packed weights. The Python cache (qtorch/_cache.py) owns them; this table holds only weak
// references: to the weight (identity; a weak reference keeps the TensorImpl's memory, so its
// address cannot be reused by another tensor while the entry exists), to the tensors the
// packed form depends on (scales, zeros), and to the packed tensors. An entry hits only if
// all are alive and the versions match the ones seen at put time, so an in-place update of a
// weight, or of its scales, or the weight's death (which frees the Python cache entry) all
// turn into a miss, and the Python path repacks.
#include <torch/extension.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "bindings.h"

namespace qtorch::cpu::fast {
namespace {

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl>;

enum Kind : int64_t { kW8A8 = 0, kW8A16 = 1, kW4A16 = 2, kKinds = 3 };

// A tensor an entry depends on: identity (weak) and the version seen at put time.
struct Ref {
  c10::TensorImpl* ptr = nullptr;
  WeakImpl weak{c10::intrusive_ptr<c10::TensorImpl>()};
  uint32_t version = 0;

  static Ref of(const at::Tensor& t) {
    Ref r;
    r.ptr = t.unsafeGetTensorImpl();
    r.weak = WeakImpl(t.getIntrusivePtr());
    r.version = t.unsafeGetTensorImpl()->version_counter().current_version();
    return r;
  }
  // `t` is the tensor this ref recorded, alive and unmodified since.
  bool matches(const at::Tensor& t) const {
    const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    return impl == ptr && !weak.expired() &&
           impl->version_counter().current_version() == version;
  }
};

struct Entry {
  Ref weight, aux0, aux1;  // aux: w_scale (W8A16) or scales, zeros (W4A16)
  int64_t group_size = 0;
  std::vector<WeakImpl> packed;
};

std::mutex g_mu;
std::unordered_map<uintptr_t, Entry> g_table;  // key: TensorImpl address * kKinds + kind
size_t g_sweep_at = 64;
PyObject* g_scoped_choice = nullptr;  // qtorch._backend._scoped_choice (a ContextVar)
PyObject* g_backend_dict = nullptr;   // qtorch._backend.__dict__ (for _global_choice)
c10::DispatchKeySet g_plain_keys, g_inference_keys;

uintptr_t key_of(const c10::TensorImpl* impl, int64_t kind) {
  return reinterpret_cast<uintptr_t>(impl) * kKinds + uintptr_t(kind);
}

// Drop entries whose weight died (amortised: only when the table has doubled since the last).
void sweep_locked() {
  if (g_table.size() < g_sweep_at) return;
  for (auto it = g_table.begin(); it != g_table.end();)
    it = it->second.weight.weak.expired() ? g_table.erase(it) : std::next(it);
  g_sweep_at = std::max<size_t>(64, 2 * g_table.size());
}

bool is_auto_or_cpu(const char* s) { return std::strcmp(s, "auto") == 0 || std::strcmp(s, "cpu") == 0; }

// A backend name (a str object) is "auto" or "cpu".
bool name_is_auto_or_cpu(PyObject* v) {
  const char* s = PyUnicode_Check(v) ? PyUnicode_AsUTF8(v) : nullptr;
  if (s == nullptr) PyErr_Clear();
  return s != nullptr && is_auto_or_cpu(s);
}

// Whether the backend in force (use_backend scope > set_backend > QTORCH_BACKEND > auto, as
// qtorch._backend.get_backend) runs CPU tensors on the cpu backend.
bool cpu_backend_in_force() {
  if (g_scoped_choice == nullptr || g_backend_dict == nullptr) return false;
  PyObject* v = nullptr;
  if (PyContextVar_Get(g_scoped_choice, nullptr, &v) < 0) {
    PyErr_Clear();
    return false;
  }
  if (v != nullptr && v != Py_None) {
    const bool ok = name_is_auto_or_cpu(v);
    Py_DECREF(v);
    return ok;
  }
  Py_XDECREF(v);
  PyObject* g = PyDict_GetItemString(g_backend_dict, "_global_choice");  // borrowed
  if (g != nullptr && g != Py_None) return name_is_auto_or_cpu(g);
  const char* env = std::getenv("QTORCH_BACKEND");
  if (env != nullptr && *env != '\0') return is_auto_or_cpu(env);  // a bad name: Python raises
  return true;
}

// No autograd recording, tracing, torch_function / dispatch modes: the op would do nothing
// but run its kernel.
bool plain_eager_state() {
  return !c10::impl::TorchDispatchModeTLS::any_modes_set() &&
         !at::impl::torch_function_mode_enabled() && !torch::jit::tracer::isTracing();
}

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

bool is_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
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

// Optional bias: null/None -> no bias (ok), a plain float [N] tensor -> it, else not ok.
bool parse_bias(PyObject* o, int64_t N, std::optional<at::Tensor>& bias) {
  if (o == nullptr || o == Py_None) return true;
  const at::Tensor* b = plain(o);
  if (b == nullptr || !is_float(*b) || b->dim() != 1 || b->size(0) != N) return false;
  bias = *b;
  return true;
}

// The live packed tensors of a hit, or empty.
std::vector<at::Tensor> lookup(int64_t kind, const at::Tensor& w, const at::Tensor* aux0,
                               const at::Tensor* aux1, int64_t group_size) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_table.find(key_of(w.unsafeGetTensorImpl(), kind));
  if (it == g_table.end()) return {};
  const Entry& e = it->second;
  if (!e.weight.matches(w) || e.group_size != group_size) return {};
  if (aux0 != nullptr && !e.aux0.matches(*aux0)) return {};
  if (aux1 != nullptr && !e.aux1.matches(*aux1)) return {};
  std::vector<at::Tensor> out;
  out.reserve(e.packed.size());
  for (const WeakImpl& p : e.packed) {
    c10::intrusive_ptr<c10::TensorImpl> s = p.lock();
    if (!s) return {};
    out.emplace_back(std::move(s));
  }
  return out;
}

// x [..., K] -> the 2-D rows the bindings take, and the output shape [..., N].
at::Tensor rows(const at::Tensor& x, int64_t N, std::vector<int64_t>& out_shape) {
  out_shape.assign(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  return x.dim() == 2 ? x : x.reshape({-1, x.size(-1)});
}

// The Python path's bias handling: cast to x.dtype first (the bindings then widen to fp32).
std::optional<at::Tensor> bias_as(const std::optional<at::Tensor>& b, const at::Tensor& x) {
  if (!b.has_value() || b->scalar_type() == x.scalar_type()) return b;
  return b->to(x.scalar_type());
}

PyObject* finish(at::Tensor out, const at::Tensor& x, const std::vector<int64_t>& shape) {
  if (x.dim() != 2) out = out.view(shape);
  return THPVariable_Wrap(std::move(out));
}

const char* const kLinearNames[] = {"x", "w_q", "w_scale", "bias"};

// Shared by the two int8-weight linears: plain x [..., K] float, w_q int8 [N, K] contiguous,
// w_scale f32 [N], bias float [N]?
bool parse_int8_linear(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames,
                       const at::Tensor*& x, const at::Tensor*& w, const at::Tensor*& s,
                       std::optional<at::Tensor>& bias) {
  PyObject* a[4];
  if (!parse(args, nargs, kwnames, kLinearNames, 4, a) || a[2] == nullptr) return false;
  if (!plain_eager_state() || !cpu_backend_in_force()) return false;
  x = plain(a[0]), w = plain(a[1]), s = plain(a[2]);
  if (x == nullptr || w == nullptr || s == nullptr) return false;
  if (!is_float(*x) || x->dim() < 1 || x->numel() == 0) return false;
  if (w->scalar_type() != at::kChar || w->dim() != 2 || !w->is_contiguous()) return false;
  const int64_t N = w->size(0), K = w->size(1);
  if (N <= 0 || K <= 0 || x->size(-1) != K) return false;
  if (s->scalar_type() != at::kFloat || s->dim() != 1 || s->size(0) != N) return false;
  return parse_bias(a[3], N, bias);
}

// The two int8-weight linears: same arguments, their own packed form and binding.
template <int64_t kKind>
PyObject* int8_weight_linear(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  HANDLE_TH_ERRORS
  const at::Tensor *x, *w, *s;
  std::optional<at::Tensor> bias;
  if (!parse_int8_linear(args, nargs, kwnames, x, w, s, bias)) Py_RETURN_NONE;
  // W8A8 takes w_scale per call; W8A16 folds it into its packed form (so it is part of the key).
  std::vector<at::Tensor> p = lookup(kKind, *w, kKind == kW8A16 ? s : nullptr, nullptr, 0);
  if (p.size() != (kKind == kW8A8 ? 1u : 2u)) Py_RETURN_NONE;
  const int64_t N = w->size(0), K = w->size(1);
  std::vector<int64_t> shape;
  const at::Tensor x2 = rows(*x, N, shape);
  const std::optional<at::Tensor> b = bias_as(bias, *x);
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = kKind == kW8A8 ? binding::int8_linear(x2, p[0], N, *s, b)
                         : binding::int8_weight_only_linear(x2, p[0], p[1], N, K, b);
  }
  return finish(std::move(out), *x, shape);
  END_HANDLE_TH_ERRORS
}

PyObject* int8_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return int8_weight_linear<kW8A8>(args, nargs, kwnames);
}

PyObject* int8_weight_only_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs,
                                  PyObject* kwnames) {
  return int8_weight_linear<kW8A16>(args, nargs, kwnames);
}

const char* const kInt4Names[] = {"x", "qweight", "scales", "zeros", "group_size", "bias"};

PyObject* int4_weight_only_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs,
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
  if (!plain_eager_state() || !cpu_backend_in_force()) Py_RETURN_NONE;
  const at::Tensor *x = plain(a[0]), *q = plain(a[1]), *sc = plain(a[2]), *z = plain(a[3]);
  if (x == nullptr || q == nullptr || sc == nullptr || z == nullptr) Py_RETURN_NONE;
  if (!is_float(*x) || x->dim() < 1 || x->numel() == 0) Py_RETURN_NONE;
  if (q->scalar_type() != at::kByte || q->dim() != 2 || !q->is_contiguous()) Py_RETURN_NONE;
  const int64_t N = q->size(0), K = 2 * q->size(1);
  if (N <= 0 || K <= 0 || K % gs != 0 || x->size(-1) != K) Py_RETURN_NONE;
  const int64_t G = K / gs;
  if (sc->scalar_type() != at::kFloat || sc->dim() != 2 || sc->size(0) != N || sc->size(1) != G)
    Py_RETURN_NONE;
  if (z->scalar_type() != at::kByte || z->dim() != 2 || z->size(0) != N || z->size(1) != G)
    Py_RETURN_NONE;
  std::optional<at::Tensor> bias;
  if (!parse_bias(a[5], N, bias)) Py_RETURN_NONE;
  std::vector<at::Tensor> p = lookup(kW4A16, *q, sc, z, gs);
  if (p.size() != 3) Py_RETURN_NONE;
  std::vector<int64_t> shape;
  const at::Tensor x2 = rows(*x, N, shape);
  const std::optional<at::Tensor> b = bias_as(bias, *x);
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = binding::int4_weight_only_linear(x2, p[0], p[1], p[2], N, K, gs, b);
  }
  return finish(std::move(out), *x, shape);
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"fast_int8_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&int8_linear)),
     METH_FASTCALL | METH_KEYWORDS,
     "int8_linear(x, w_q, w_scale, bias=None) on the eager fast path, or None"},
    {"fast_int8_weight_only_linear",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&int8_weight_only_linear)),
     METH_FASTCALL | METH_KEYWORDS,
     "int8_weight_only_linear(x, w_q, w_scale, bias=None) on the eager fast path, or None"},
    {"fast_int4_weight_only_linear",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&int4_weight_only_linear)),
     METH_FASTCALL | METH_KEYWORDS,
     "int4_weight_only_linear(x, qweight, scales, zeros, group_size, bias=None) on the eager "
     "fast path, or None"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

void register_fast_path(pybind11::module_& m) {
  g_plain_keys = at::empty({1}).key_set();
  {
    c10::InferenceMode guard;
    g_inference_keys = at::empty({1}).key_set();
  }
  if (PyModule_AddFunctions(m.ptr(), kMethods) < 0) throw pybind11::error_already_set();
  m.def(
      "fast_init",
      [](pybind11::object scoped_choice, pybind11::dict backend_globals) {
        TORCH_CHECK_TYPE(PyContextVar_CheckExact(scoped_choice.ptr()),
                         "fast_init: scoped_choice must be a contextvars.ContextVar");
        Py_XDECREF(g_scoped_choice);
        Py_XDECREF(g_backend_dict);
        g_scoped_choice = scoped_choice.inc_ref().ptr();
        g_backend_dict = backend_globals.inc_ref().ptr();
      },
      "give the fast path qtorch._backend's use_backend ContextVar and its globals (for "
      "_global_choice, the set_backend choice)");
  m.def(
      "fast_put",
      [](int64_t kind, const at::Tensor& weight, std::optional<at::Tensor> aux0,
         std::optional<at::Tensor> aux1, int64_t group_size, std::vector<at::Tensor> packed) {
        TORCH_CHECK_VALUE(kind >= 0 && kind < kKinds, "fast_put: bad kind ", kind);
        if (weight.is_inference()) return;  // no version counter: leave it to the Python path
        Entry e;
        e.weight = Ref::of(weight);
        if (aux0) {
          if (aux0->is_inference()) return;
          e.aux0 = Ref::of(*aux0);
        }
        if (aux1) {
          if (aux1->is_inference()) return;
          e.aux1 = Ref::of(*aux1);
        }
        e.group_size = group_size;
        for (const at::Tensor& p : packed) e.packed.emplace_back(p.getIntrusivePtr());
        std::lock_guard<std::mutex> lock(g_mu);
        sweep_locked();
        g_table[key_of(weight.unsafeGetTensorImpl(), kind)] = std::move(e);
      },
      "record a packed weight (weakly) for the fast path; the Python cache owns it");
  m.def(
      "fast_clear",
      []() {
        std::lock_guard<std::mutex> lock(g_mu);
        g_table.clear();
      },
      "forget every fast-path entry");
  m.def(
      "fast_entries",
      []() {
        std::lock_guard<std::mutex> lock(g_mu);
        return g_table.size();
      },
      "number of fast-path entries (tests)");
}

}  // namespace qtorch::cpu::fast
