// Python callables inside the C++ core: GIL handling and error transport, shared by the bindings.
//
// The core runs with the GIL released; each call of a Python callback takes it back for the
// duration of the call. A Python exception raised there stays set on this thread (with a note
// saying where it came from) while a PythonErrorPending unwinds the C++ frames, and is re-raised
// as itself once the GIL is back (without_gil). Python objects captured by C++ closures live in
// a PyHolder, whose destructor takes the GIL, since the core may copy or drop callables freely.
#pragma once

#include <torch/extension.h>

#include <exception>
#include <string>
#include <type_traits>
#include <utility>

#include "diffeqlayers/solve.h"

namespace diffeqlayers::bindings {

namespace py = pybind11;

// A Python norm(x) -> scalar tensor as the solver's error norm (module.cpp).
ErrorNorm python_norm(py::object norm);

// Owns a Python object; safe to destroy without holding the GIL.
struct PyHolder {
  explicit PyHolder(py::object o) : obj(std::move(o)) {}
  ~PyHolder() {
    py::gil_scoped_acquire gil;
    obj = py::object();
  }
  py::object obj;
};

// Thrown through the C++ core when a Python callback raised; the Python error is set.
struct PythonErrorPending : std::exception {
  const char* what() const noexcept override { return "a Python callback raised"; }
};

// Runs `body` (which calls into Python) with the GIL taken; a Python exception it raises is
// left set, with `note` added to it when non-empty, and PythonErrorPending is thrown instead.
// `note` is a string or a callable returning one, called only when there is an error (callbacks
// run once per evaluation of f: formatting the time each call cost more than nothing).
template <typename Body, typename Note = std::string>
auto call_python(Body&& body, Note&& note = {}) -> decltype(body()) {
  py::gil_scoped_acquire gil;
  try {
    return body();
  } catch (py::error_already_set& e) {
    py::object value = e.value();
    std::string text;
    if constexpr (std::is_invocable_v<Note>)
      text = note();
    else
      text = note;
    if (!text.empty() && value && py::hasattr(value, "add_note")) {
      try {
        value.attr("add_note")(text);
      } catch (py::error_already_set&) {
        // A note is a courtesy; never replace the user's exception with our own failure.
      }
    }
    e.restore();
    throw PythonErrorPending();
  } catch (py::builtin_exception& e) {
    e.set_error();
    throw PythonErrorPending();
  }
}

// Runs `body` (the C++ core) with the GIL released and re-raises a callback's Python error.
template <typename Body>
auto without_gil(Body&& body) -> decltype(body()) {
  try {
    py::gil_scoped_release release;
    return body();
  } catch (PythonErrorPending&) {
    throw py::error_already_set();
  }
}

// The tensor a callback returned, or a TypeError naming `who` (and `where`, e.g. the time).
inline torch::Tensor returned_tensor(const py::object& out, const std::string& who,
                                     const std::string& where = {}) {
  if (!THPVariable_Check(out.ptr()))
    throw py::type_error(who + " must return a torch.Tensor, got " +
                         py::str(py::type::of(out)).cast<std::string>() + where);
  return THPVariable_Unpack(out.ptr());
}

}  // namespace diffeqlayers::bindings
