#include "harness.h"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <iostream>

namespace tl {

std::vector<TestCase>& registry() {
  static std::vector<TestCase> cases;
  return cases;
}

namespace {
std::vector<std::string>& context_stack() {
  static std::vector<std::string> stack;
  return stack;
}
}  // namespace

Context::Context(std::string text) { context_stack().push_back(std::move(text)); }
Context::~Context() { context_stack().pop_back(); }

void fail(const char* file, int line, const std::string& message) {
  std::cerr << file << ":" << line << ": " << message << "\n";
  for (const std::string& c : context_stack()) std::cerr << "    with " << c << "\n";
  throw CheckFailed{};
}

std::string show_bytes(std::string_view s) {
  std::string out = "\"";
  const std::size_t shown = s.size() < 200 ? s.size() : 200;
  for (std::size_t i = 0; i < shown; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7F && c != '"' && c != '\\') {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  out += "\"";
  if (shown < s.size()) out += "... (" + std::to_string(s.size()) + " bytes)";
  return out;
}

}  // namespace tl

// Runs every registered case, or those whose name contains argv[1]. Exits non-zero when any case fails
// or when nothing ran (a filter that matches nothing must not look like a pass).
int main(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : nullptr;
  int ran = 0, failed = 0;
  for (const tl::TestCase& tc : tl::registry()) {
    if (filter && !std::strstr(tc.name, filter)) continue;
    ++ran;
    const auto start = std::chrono::steady_clock::now();
    bool ok = false;
    try {
      tc.fn();
      ok = true;
    } catch (const tl::CheckFailed&) {
    } catch (const std::exception& e) {
      std::cerr << "unexpected exception: " << e.what() << "\n";
    } catch (...) {
      std::cerr << "unexpected exception of unknown type\n";
    }
    const auto ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start).count();
    std::cout << (ok ? "[  OK  ] " : "[ FAIL ] ") << tc.name << " (" << ms << " ms)" << std::endl;
    failed += !ok;
  }
  std::cout << ran - failed << "/" << ran << " test cases passed" << std::endl;
  if (ran == 0) {
    std::cerr << "no test case matched\n";
    return 1;
  }
  return failed ? 1 : 0;
}
