// A persistent team of threads for the fused step, with a spinning barrier of its own.
//
// Why not OpenMP: libgomp throttles its barrier spin to ~1000 iterations once a process holds more
// OpenMP threads than CPUs, which a server does as soon as a second thread (the engine's) runs
// parallel code: every barrier then sleeps on a futex and pays a wake-up, ~240 times per step (a
// decode step measured 3.4 ms in-process and 12 ms inside the server). Here a barrier always spins
// (yielding the CPU after a while, for whatever preempted a member), and idle members spin briefly
// between steps, then sleep, so an idle server burns nothing.
#pragma once
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define TAILSERVE_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define TAILSERVE_PAUSE() asm volatile("yield" ::: "memory")
#else
#define TAILSERVE_PAUSE() std::this_thread::yield()
#endif

namespace tailserve {

class Team {
 public:
  // The one team of the module: defined in llama.cpp alone, so every translation unit that runs on the
  // team (the step, peak_macs) shares one set of threads.
  static Team& instance();

  ~Team() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  // Runs job(tid, n) on n members, the caller being member 0, and returns when all have finished.
  // Not reentrant: one step at a time (the engine runs one).
  void run(int n, const std::function<void(int, int)>& job) {
    n = std::max(n, 1);
    while (static_cast<int>(workers_.size()) < n - 1) {
      const int tid = static_cast<int>(workers_.size()) + 1;
      const uint64_t seen = epoch_.load(std::memory_order_acquire);  // before this step's bump
      workers_.emplace_back([this, tid, seen] { loop(tid, seen); });
    }
    job_ = &job;
    size_ = n;
    finished_.store(0, std::memory_order_relaxed);
    // seq_cst on both sides (here and around a member's sleep): either it sees the new epoch, or this
    // sees it sleeping and wakes it.
    epoch_.fetch_add(1, std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
    job(0, n);
    const int others = static_cast<int>(workers_.size());
    for (int spins = 0; finished_.load(std::memory_order_acquire) < others;) wait_step(spins);
  }

  // All n members meet here before any goes on.
  void barrier(int n) {
    if (n <= 1) return;
    const uint32_t gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(gen + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == gen;) wait_step(spins);
  }

 private:
  Team() = default;

  // Spin; after ~50 µs of it, yield the CPU on each round (a member may have been preempted).
  static void wait_step(int& spins) {
    if (++spins < 2000) {
      TAILSERVE_PAUSE();
    } else {
      sched_yield();
    }
  }

  void loop(int tid, uint64_t seen) {
    using clock = std::chrono::steady_clock;
    for (;;) {
      // Wait for the next step: spin for a while (the engine's bookkeeping between steps is ~1 ms;
      // after the first ~50 µs yielding each round, so HTTP threads get the core), then sleep.
      const auto until = clock::now() + std::chrono::milliseconds(kIdleSpinMs);
      uint64_t e;
      for (int spins = 0; (e = epoch_.load(std::memory_order_acquire)) == seen;) {
        wait_step(spins);
        if ((spins & 255) == 0 && clock::now() > until) {
          std::unique_lock<std::mutex> lk(mu_);
          sleeping_.fetch_add(1, std::memory_order_seq_cst);
          cv_.wait(lk, [&] { return stop_ || epoch_.load(std::memory_order_seq_cst) != seen; });
          sleeping_.fetch_sub(1, std::memory_order_seq_cst);
          if (stop_) return;
          spins = 0;
        }
      }
      seen = e;
      if (tid < size_) (*job_)(tid, size_);
      finished_.fetch_add(1, std::memory_order_release);
    }
  }

  static constexpr int kIdleSpinMs = 3;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  const std::function<void(int, int)>* job_ = nullptr;
  int size_ = 1;
  alignas(64) std::atomic<uint64_t> epoch_{0};
  alignas(64) std::atomic<int> finished_{0};
  alignas(64) std::atomic<int> sleeping_{0};
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<uint32_t> generation_{0};
};

}  // namespace tailserve
