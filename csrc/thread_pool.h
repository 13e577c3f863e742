// A pool of worker threads that runs queued jobs one after another, each job split into phases whose items all
// workers share. Callers wait on a condition variable (no spinning); workers sleep between jobs.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace kt {

// A job is a sequence of phases. Before each phase one worker calls prepare(phase), which returns the phase's item
// count (it may depend on the previous phases' results); then every worker pulls items until none is left.
class Job {
 public:
  virtual ~Job() = default;
  virtual int num_phases() const = 0;
  virtual size_t prepare(int phase) = 0;
  virtual void run(int phase, size_t item, int worker) = 0;
  // Runs on one worker after the last phase (also after a failure), before waiters wake: release what the job
  // holds here, since workers may keep a reference to the job object a little longer.
  virtual void finish() {}
  // A short name per phase for the profile ("forward.gate_up"); nullptr: not profiled.
  virtual const char* phase_name(int) const { return nullptr; }

  void wait();  // blocks until the pool has run the job; rethrows its error

 private:
  friend class ThreadPool;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr error_;
};

// Wall time per job phase, summed over all pools, when KT_PROFILE is set in the environment (read once).
struct PhaseTime {
  std::string name;
  double seconds;
  long calls;
};
bool profiling_enabled();
std::vector<PhaseTime> profile(bool reset);

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int threads() const { return static_cast<int>(workers_.size()); }
  void submit(std::shared_ptr<Job> job);

 private:
  void worker_main(int id);
  void run_job(Job& job, int id);
  void barrier(int id);

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool stop_ = false;

  // Shared state of the job being run.
  std::shared_ptr<Job> current_;
  uint64_t generation_ = 0;  // bumped per job so sleeping workers know there is a new one
  std::atomic<size_t> next_item_{0};
  std::atomic<size_t> item_count_{0};
  std::atomic<int> arrived_{0};
  std::atomic<uint64_t> barrier_epoch_{0};
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
  std::mutex error_mu_;
};

}  // namespace kt
