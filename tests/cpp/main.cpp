#include "check.hpp"

int main(int argc, char** argv) {
  auto& reg = check::registry();
  if (argc > 1 && std::strcmp(argv[1], "--list") == 0) {
    for (auto& kv : reg) std::printf("%s\n", kv.first.c_str());
    return 0;
  }
  int run = 0;
  for (auto& kv : reg) {
    if (argc > 1 && kv.first != argv[1]) continue;
    ++run;
    try {
      kv.second();
    } catch (const std::exception& e) {
      check::fail(kv.first.c_str(), 0, std::string("uncaught exception: ") + e.what());
    }
  }
  if (run == 0) {
    std::fprintf(stderr, "no test case matched\n");
    return 2;
  }
  std::printf("%d case(s), %d failure(s)\n", run, check::failures());
  return check::failures() == 0 ? 0 : 1;
}
