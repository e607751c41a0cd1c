// A deliberately small unit-test harness: TEST_CASE registers a function, CHECK* record
// failures with file:line, and main() runs one named case (ctest registers each case as its
// own test) or all of them. No third-party test framework is needed to build the tests.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>

namespace check {

inline std::map<std::string, std::function<void()>>& registry() {
  static std::map<std::string, std::function<void()>> r;
  return r;
}
inline int& failures() {
  static int f = 0;
  return f;
}
struct Registrar {
  Registrar(const char* name, std::function<void()> fn) { registry()[name] = std::move(fn); }
};
inline void fail(const char* file, int line, const std::string& what) {
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
  ++failures();
}

}  // namespace check

#define CHECK_CAT2(a, b) a##b
#define CHECK_CAT(a, b) CHECK_CAT2(a, b)
#define TEST_CASE(name)                                                              \
  static void CHECK_CAT(test_fn_, name)();                                           \
  static check::Registrar CHECK_CAT(test_reg_, name)(#name, CHECK_CAT(test_fn_, name)); \
  static void CHECK_CAT(test_fn_, name)()

#define CHECK(cond)                                              \
  do {                                                           \
    if (!(cond)) check::fail(__FILE__, __LINE__, #cond);         \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                           \
  do {                                                                                  \
    const double va_ = static_cast<double>(a), vb_ = static_cast<double>(b);           \
    if (!(std::fabs(va_ - vb_) <= (tol))) {                                             \
      std::ostringstream os_;                                                           \
      os_ << #a << " = " << va_ << " vs " << #b << " = " << vb_ << " (tol " << (tol) << ")"; \
      check::fail(__FILE__, __LINE__, os_.str());                                       \
    }                                                                                   \
  } while (0)

#define CHECK_THROWS(expr, exc_type)                                             \
  do {                                                                           \
    bool thrown_ = false;                                                        \
    try {                                                                        \
      (void)(expr);                                                              \
    } catch (const exc_type&) {                                                  \
      thrown_ = true;                                                            \
    } catch (...) {                                                              \
    }                                                                            \
    if (!thrown_) check::fail(__FILE__, __LINE__, #expr " did not throw " #exc_type); \
  } while (0)
