#include <atomic>
#include <cstdint>
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

TEST_CASE(parallel_for_dynamic_covers_range_once_in_chunks) {
  for (int threads : {1, 2, 3, 8}) {
    for (std::int64_t chunk : {1, 7, 64, 1000}) {
      std::vector<std::atomic<int>> hits(301);
      std::atomic<int> bad_chunks{0};
      deepalign::parallel_for_dynamic(
          5, 301, threads,
          [&](std::int64_t lo, std::int64_t hi) {
            // Chunks start on the grid and are `chunk` long except the last one.
            if ((lo - 5) % chunk != 0 || (hi - lo != chunk && hi != 301)) ++bad_chunks;
            for (std::int64_t i = lo; i < hi; ++i) ++hits[static_cast<std::size_t>(i)];
          },
          chunk);
      CHECK(bad_chunks.load() == 0);
      for (std::size_t i = 0; i < hits.size(); ++i) CHECK(hits[i].load() == (i >= 5 ? 1 : 0));
    }
  }
  int calls = 0;
  deepalign::parallel_for_dynamic(3, 3, 2, [&](std::int64_t, std::int64_t) { ++calls; }, 4);
  CHECK(calls == 0);
}

TEST_CASE(parallel_for_dynamic_rethrows_worker_exception) {
  CHECK_THROWS(deepalign::parallel_for_dynamic(
                   0, 100, 3,
                   [](std::int64_t lo, std::int64_t) {
                     if (lo == 50) throw std::runtime_error("chunk 50");
                   },
                   10),
               std::runtime_error);
}
