#include "thread_pool.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define KT_CPU_RELAX() _mm_pause()
#else
#define KT_CPU_RELAX() std::this_thread::yield()
#endif

#include <chrono>
#include <cstdlib>
#include <map>

namespace kt {

namespace {
std::mutex g_profile_mu;
std::map<std::string, std::pair<double, long>> g_profile;
}  // namespace

bool profiling_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("KT_PROFILE");
    return v && *v && std::string(v) != "0";
  }();
  return on;
}

std::vector<PhaseTime> profile(bool reset) {
  std::lock_guard<std::mutex> lock(g_profile_mu);
  std::vector<PhaseTime> out;
  for (const auto& [name, v] : g_profile) out.push_back({name, v.first, v.second});
  if (reset) g_profile.clear();
  return out;
}

void Job::wait() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return done_; });
  if (error_) std::rethrow_exception(error_);
}

ThreadPool::ThreadPool(int threads) {
  if (threads < 1) threads = 1;
  for (int i = 0; i < threads; ++i) workers_.emplace_back([this, i] { worker_main(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::submit(std::shared_ptr<Job> job) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(job));
  }
  cv_.notify_all();
}

// Workers meet here between phases. Phases are short (milliseconds), so waiting spins with a pause and then
// yields; between jobs workers sleep on the condition variable instead.
void ThreadPool::barrier(int) {
  const int n = threads();
  const uint64_t epoch = barrier_epoch_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
    arrived_.store(0, std::memory_order_relaxed);
    barrier_epoch_.fetch_add(1, std::memory_order_acq_rel);
    return;
  }
  for (int spin = 0; barrier_epoch_.load(std::memory_order_acquire) == epoch; ++spin) {
    if (spin < 4096) {
      KT_CPU_RELAX();
    } else {
      std::this_thread::yield();
    }
  }
}

void ThreadPool::run_job(Job& job, int id) {
  const bool timed = id == 0 && profiling_enabled();
  for (int phase = 0; phase < job.num_phases(); ++phase) {
    const auto start = std::chrono::steady_clock::now();
    if (id == 0) {
      size_t count = 0;
      if (!failed_.load()) {
        try {
          count = job.prepare(phase);
        } catch (...) {
          std::lock_guard<std::mutex> lock(error_mu_);
          if (!error_) error_ = std::current_exception();
          failed_ = true;
        }
      }
      item_count_.store(count, std::memory_order_relaxed);
      next_item_.store(0, std::memory_order_release);
    }
    barrier(id);
    const size_t count = item_count_.load(std::memory_order_relaxed);
    for (size_t item; !failed_.load(std::memory_order_relaxed) &&
                      (item = next_item_.fetch_add(1, std::memory_order_acq_rel)) < count;) {
      try {
        job.run(phase, item, id);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mu_);
        if (!error_) error_ = std::current_exception();
        failed_ = true;
      }
    }
    barrier(id);
    if (timed && job.phase_name(phase)) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::lock_guard<std::mutex> lock(g_profile_mu);
      auto& slot = g_profile[job.phase_name(phase)];
      slot.first += s;
      slot.second += 1;
    }
  }
}

void ThreadPool::worker_main(int id) {
  uint64_t seen = 0;
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (id == 0) {
        cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
        if (stop_ && queue_.empty()) {
          current_.reset();
          ++generation_;
          lock.unlock();
          cv_.notify_all();
          return;
        }
        current_ = queue_.front();
        queue_.pop_front();
        failed_ = false;
        error_ = nullptr;
        ++generation_;
        seen = generation_;
        job = current_;
        lock.unlock();
        cv_.notify_all();
      } else {
        cv_.wait(lock, [this, seen] { return generation_ != seen; });
        seen = generation_;
        if (!current_) return;
        job = current_;
      }
    }
    run_job(*job, id);
    if (id == 0) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        current_.reset();  // the job (and what it holds) dies with its last user, not with the next job
      }
      try {
        job->finish();
      } catch (...) {
        if (!error_) error_ = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(job->mu_);
      job->error_ = error_;
      job->done_ = true;
      job->cv_.notify_all();
    }
  }
}

}  // namespace kt
