// A deliberately tiny test harness: the tests must build with nothing but a compiler (no network, so no
// GoogleTest). A failed check throws, which ends the current test case and moves on to the next one:
// inside a fuzz loop the first counterexample is the useful one, not thousands of repeats.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace tl {

struct TestCase {
  const char* name;
  void (*fn)();
};
std::vector<TestCase>& registry();
struct Registrar {
  Registrar(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

// Thrown by a failed check; deliberately not a std::exception so no code under test can swallow it.
struct CheckFailed {};
[[noreturn]] void fail(const char* file, int line, const std::string& message);

// Extra lines printed with a failure (e.g. the random input that broke a property), as a stack.
class Context {
 public:
  explicit Context(std::string text);
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
};

std::string show_bytes(std::string_view s);
inline std::string show(std::string_view s) { return show_bytes(s); }
inline std::string show(const std::string& s) { return show_bytes(s); }
inline std::string show(const char* s) { return show_bytes(s); }
inline std::string show(bool b) { return b ? "true" : "false"; }
template <class T>
std::string show(const T& v);
template <class A, class B>
std::string show(const std::pair<A, B>& p) {
  return "(" + show(p.first) + ", " + show(p.second) + ")";
}
template <class T>
std::string show(const std::vector<T>& v) {
  std::string out = "[";
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (i == 40) {
      out += ", ... (" + std::to_string(v.size()) + " items)";
      break;
    }
    out += (i ? ", " : "") + show(v[i]);
  }
  return out + "]";
}
template <class T>
std::string show(const T& v) {
  std::ostringstream os;
  if constexpr (std::is_same_v<T, unsigned char> || std::is_same_v<T, signed char> || std::is_same_v<T, char>)
    os << static_cast<int>(v);
  else
    os << v;
  return os.str();
}

}  // namespace tl

#define TEST_CASE(name)                                         \
  static void name();                                           \
  static const ::tl::Registrar name##_registrar(#name, &name);  \
  static void name()

#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) ::tl::fail(__FILE__, __LINE__, "CHECK(" #cond ")"); \
  } while (0)

#define CHECK_EQ(a, b)                                                                               \
  do {                                                                                               \
    const auto& tl_a_ = (a);                                                                         \
    const auto& tl_b_ = (b);                                                                         \
    if (!(tl_a_ == tl_b_))                                                                           \
      ::tl::fail(__FILE__, __LINE__,                                                                 \
                 "CHECK_EQ(" #a ", " #b ")\n    left:  " + ::tl::show(tl_a_) + "\n    right: " + \
                     ::tl::show(tl_b_));                                                             \
  } while (0)

// Checks that `expr` throws exactly `Exc` (or a subclass) and that its message contains `needle`:
// a message that no longer says where the input went wrong is a regression too.
#define CHECK_THROWS(expr, Exc, needle)                                                             \
  do {                                                                                              \
    bool tl_thrown_ = false;                                                                        \
    try {                                                                                           \
      (void)(expr);                                                                                 \
    } catch (const Exc& tl_e_) {                                                                    \
      tl_thrown_ = true;                                                                            \
      if (std::string(tl_e_.what()).find(needle) == std::string::npos)                              \
        ::tl::fail(__FILE__, __LINE__,                                                              \
                   "CHECK_THROWS(" #expr "): the message lacks " + ::tl::show(std::string(needle)) + \
                       "\n    message: " + tl_e_.what());                                           \
    } catch (const std::exception& tl_e_) {                                                         \
      ::tl::fail(__FILE__, __LINE__,                                                                \
                 "CHECK_THROWS(" #expr "): threw another exception type: " +                        \
                     std::string(tl_e_.what()));                                                    \
    }                                                                                               \
    if (!tl_thrown_) ::tl::fail(__FILE__, __LINE__, "CHECK_THROWS(" #expr "): nothing was thrown");  \
  } while (0)
