#include <atomic>
#include <stdexcept>
#include <vector>

#include "check.hpp"
#include "deepalign/parallel.hpp"

using deepalign::parallel_for;

TEST_CASE(parallel_for_covers_range_once) {
  for (int threads : {1, 2, 3, 8}) {
    std::vector<std::atomic<int>> hits(1000);
    parallel_for(0, 1000, threads, [&](std::int64_t lo, std::int64_t hi) {
      for (auto i = lo; i < hi; ++i) hits[static_cast<std::size_t>(i)]++;
    });
    for (auto& h : hits) CHECK(h.load() == 1);
  }
}

TEST_CASE(parallel_for_rethrows_worker_exception) {
  CHECK_THROWS(parallel_for(0, 100, 4,
                            [](std::int64_t lo, std::int64_t) {
                              if (lo > 0) throw std::runtime_error("boom");
                            }),
               std::runtime_error);
}

TEST_CASE(resolve_num_threads_rejects_negative) {
  CHECK(deepalign::resolve_num_threads(0) >= 1);
  CHECK(deepalign::resolve_num_threads(3) == 3);
  CHECK_THROWS(deepalign::resolve_num_threads(-1), std::invalid_argument);
}
