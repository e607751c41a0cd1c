#include "deepalign/parallel.hpp"

#include <algorithm>
#include <atomic>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace deepalign {

int resolve_num_threads(int num_threads) {
  if (num_threads < 0) {
    throw std::invalid_argument("num_threads must be >= 0 (0 = all cores), got " +
                                std::to_string(num_threads));
  }
  if (num_threads == 0) {
    const unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 1 : static_cast<int>(hw);
  }
  return num_threads;
}

void parallel_for(std::int64_t begin, std::int64_t end, int num_threads,
                  const std::function<void(std::int64_t, std::int64_t)>& body,
                  std::int64_t min_chunk) {
  const std::int64_t n = end - begin;
  if (n <= 0) return;
  min_chunk = std::max<std::int64_t>(1, min_chunk);
  const std::int64_t max_threads = std::max<std::int64_t>(1, n / min_chunk);
  const int threads =
      static_cast<int>(std::min<std::int64_t>(resolve_num_threads(num_threads), max_threads));
  if (threads == 1) {
    body(begin, end);
    return;
  }

  std::exception_ptr first_error;
  std::mutex error_mutex;
  auto run_chunk = [&](int t) {
    const std::int64_t lo = begin + n * t / threads;
    const std::int64_t hi = begin + n * (t + 1) / threads;
    try {
      body(lo, hi);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!first_error) first_error = std::current_exception();
    }
  };

  std::vector<std::thread> workers;
  workers.reserve(static_cast<std::size_t>(threads - 1));
  for (int t = 1; t < threads; ++t) workers.emplace_back(run_chunk, t);
  run_chunk(0);
  for (auto& w : workers) w.join();
  if (first_error) std::rethrow_exception(first_error);
}

void parallel_for_dynamic(std::int64_t begin, std::int64_t end, int num_threads,
                          const std::function<void(std::int64_t, std::int64_t)>& body,
                          std::int64_t chunk) {
  const std::int64_t n = end - begin;
  if (n <= 0) return;
  chunk = std::max<std::int64_t>(1, chunk);
  const std::int64_t chunks = (n + chunk - 1) / chunk;
  const int threads =
      static_cast<int>(std::min<std::int64_t>(resolve_num_threads(num_threads), chunks));
  std::atomic<std::int64_t> next{0};
  // One index per thread; each thread then takes chunks until none is left.
  parallel_for(0, threads, threads, [&](std::int64_t t0, std::int64_t t1) {
    for (std::int64_t t = t0; t < t1; ++t) {
      for (std::int64_t c = next++; c < chunks; c = next++) {
        body(begin + c * chunk, std::min(end, begin + (c + 1) * chunk));
      }
    }
  });
}

}  // namespace deepalign
