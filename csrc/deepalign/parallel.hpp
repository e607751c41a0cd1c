// Minimal fork-join parallelism for the core's kernels.
//
// Kernels split their work into contiguous index ranges (rows of an image, RANSAC hypotheses)
// and call parallel_for. Threads are started per call: every kernel here runs for at least
// hundreds of microseconds, so the ~20 us a thread costs to start is noise, and there is no
// pool whose lifetime has to be managed across Python interpreters and forks.
#pragma once

#include <cstdint>
#include <exception>
#include <functional>

namespace deepalign {

// Number of worker threads for a `num_threads` argument: 0 means all hardware threads,
// a negative value is an error (std::invalid_argument).
int resolve_num_threads(int num_threads);

// Calls body(begin_i, end_i) on disjoint chunks covering [begin, end) using up to
// `num_threads` threads (0 = all cores). The calling thread does one chunk itself. The first
// exception thrown by any chunk is rethrown in the caller after all threads have joined.
// `min_chunk` keeps tiny ranges on one thread.
void parallel_for(std::int64_t begin, std::int64_t end, int num_threads,
                  const std::function<void(std::int64_t, std::int64_t)>& body,
                  std::int64_t min_chunk = 1);

// Like parallel_for, but [begin, end) is cut into chunks of `chunk` indices that the threads
// take in turn from a shared counter. On a shared machine a static split waits for its
// slowest part, i.e. for any thread that the OS deschedules; here the other threads take over
// its remaining chunks. Only for bodies whose result does not depend on how the range is cut
// (independent rows).
void parallel_for_dynamic(std::int64_t begin, std::int64_t end, int num_threads,
                          const std::function<void(std::int64_t, std::int64_t)>& body,
                          std::int64_t chunk);

}  // namespace deepalign
