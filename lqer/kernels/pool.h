// Part of int4_kernel.cc: the kernel's persistent thread pool.

#pragma once

#include "cpu.h"

namespace lqer {
namespace {

// ---------------------------------------------------------------------------
// A small persistent thread pool. Run(n, k, fn) runs fn(0..n-1) on the
// caller and up to k-1 workers. Tasks are claimed from one atomic word that
// also holds the job's generation and task count, so a worker that wakes
// late (the cores are shared) finds the job gone and claims nothing; the
// caller never waits for a worker that has not started a task, it runs what
// is left itself and waits only for tasks in flight. Workers spin for
// LQER_SPIN_US (default 50) after a job, then sleep on a condition variable;
// all spinning yields every 64 pauses, so two of our threads sharing one
// core (the other one busy) hand it over at once instead of after a spin.

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  void Run(int n_tasks, int n_threads, const std::function<void(int)>& fn) {
    if (n_tasks <= 0) return;
    n_threads = std::min(n_threads, n_tasks);
    std::unique_lock<std::mutex> run_lock(run_mu_, std::try_to_lock);
    if (n_threads <= 1 || !run_lock.owns_lock() || n_tasks >= (1 << 20)) {
      // Serial, or busy (a call on another thread): run inline.
      for (int i = 0; i < n_tasks; ++i) fn(i);
      return;
    }
    Grow(n_threads - 1);
    spin_us_.store(EnvInt("LQER_SPIN_US", 50), std::memory_order_relaxed);
    active_.store(n_threads - 1, std::memory_order_relaxed);
    fn_.store(&fn, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    gen_ = (gen_ + 1) & kGenMask;
    state_.store(Pack(gen_, n_tasks, 0), std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
    Work(gen_);
    // Wait for tasks in flight. Yield early: when the worker shares this
    // core (the other is busy), spinning only delays it.
    int spins = 0;
    while (done_.load(std::memory_order_acquire) < n_tasks) {
      if (++spins < 64) _mm_pause();
      else std::this_thread::yield();
    }
  }

 private:
  static constexpr uint64_t kGenMask = (1ull << 24) - 1;
  static uint64_t Pack(uint64_t gen, uint64_t n, uint64_t next) {
    return (gen << 40) | (n << 20) | next;
  }

  // Claims and runs tasks of job `gen` until none is left.
  void Work(uint64_t gen) {
    uint64_t st = state_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t g = st >> 40, n = (st >> 20) & 0xfffff, next = st & 0xfffff;
      if (g != gen || next >= n) return;
      if (state_.compare_exchange_weak(st, st + 1, std::memory_order_acq_rel)) {
        (*fn_.load(std::memory_order_relaxed))(static_cast<int>(next));
        done_.fetch_add(1, std::memory_order_release);
        st = state_.load(std::memory_order_acquire);
      }
    }
  }

  void Grow(int n) {
    while (static_cast<int>(threads_.size()) < n) {
      const int id = static_cast<int>(threads_.size());
      threads_.emplace_back([this, id] { Loop(id); });
    }
  }

  void Loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t g = state_.load(std::memory_order_acquire) >> 40;
      if (g == seen) {
        auto t0 = std::chrono::steady_clock::now();
        const int64_t spin_us = spin_us_.load(std::memory_order_relaxed);
        int k = 0;
        while ((g = state_.load(std::memory_order_acquire) >> 40) == seen) {
          _mm_pause();
          if ((++k & 63) == 0) {
            if (std::chrono::duration_cast<std::chrono::microseconds>(
                    std::chrono::steady_clock::now() - t0)
                    .count() >= spin_us)
              break;
            std::this_thread::yield();  // cooperative if sharing a core
          }
        }
        if (g == seen) {
          std::unique_lock<std::mutex> lk(mu_);
          sleeping_.fetch_add(1, std::memory_order_seq_cst);
          while ((g = state_.load(std::memory_order_seq_cst) >> 40) == seen &&
                 !stop_)
            cv_.wait(lk);
          sleeping_.fetch_sub(1, std::memory_order_seq_cst);
          if (stop_) return;
        }
      }
      seen = g;
      if (id < active_.load(std::memory_order_relaxed)) Work(g);
    }
  }

  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::thread> threads_;
  std::atomic<const std::function<void(int)>*> fn_{nullptr};
  std::atomic<uint64_t> state_{0};
  std::atomic<int> done_{0};
  std::atomic<int> active_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<int64_t> spin_us_{50};
  uint64_t gen_ = 0;
  bool stop_ = false;
};

Pool& GetPool() {
  static Pool* pool = new Pool;  // never destroyed: workers may outlive exit
  return *pool;
}

}  // namespace
}  // namespace lqer
