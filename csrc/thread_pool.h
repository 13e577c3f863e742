// A pool of worker threads that runs queued jobs one after another, each job split into phases whose items all
// workers share. Callers wait on a condition variable (no spinning); workers sleep between jobs.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace kt {

struct PoolState;

// A job is a sequence of phases. Before each phase one worker calls prepare(phase), which returns the phase's item
// count (it may depend on the previous phases' results); then every worker pulls items until none is left.
class Job {
 public:
  virtual ~Job() = default;
  virtual int num_phases() const = 0;
  virtual size_t prepare(int phase) = 0;
  virtual void run(int phase, size_t item, int worker) = 0;
  // Runs on one worker after the last phase (also after a failure or a cancel, then with completed false), before
  // waiters wake: release what the job holds here, since workers may keep a reference to the job a little longer.
  virtual void finish(bool /*completed*/) {}
  // A short name per phase for the profile ("forward.gate_up"); nullptr: not profiled.
  virtual const char* phase_name(int) const { return nullptr; }

  // Blocks until the pool has run the job; rethrows its error. Throws std::runtime_error in a fork() child whose
  // parent submitted the job (no thread there will ever run it).
  void wait();
  // wait() for at most `timeout`: whether the job is done (its error is rethrown by wait()).
  bool wait_for(std::chrono::milliseconds timeout);
  // Asks the workers to stop at their next work item: the job's outputs are then undefined. It still finishes
  // (finish(false)) and wakes its waiters.
  void cancel() { cancelled_.store(true, std::memory_order_relaxed); }
  bool cancelled() const { return cancelled_.load(std::memory_order_relaxed); }
  // Seconds the pool spent running the job (not waiting in its queue); meaningful once wait() has returned.
  double run_seconds() const { return run_seconds_; }

 private:
  friend class ThreadPool;
  friend struct PoolState;
  void check_not_orphaned() const;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  double run_seconds_ = 0;
  std::exception_ptr error_;
  std::atomic<bool> cancelled_{false};
  uint64_t forks_at_submit_ = 0;
};

// Wall time per job phase, summed over all pools, while profiling is on (off by default; the binding switches it).
struct PhaseTime {
  std::string name;
  double seconds;
  long calls;
};
void set_profiling(bool on);
bool profiling_enabled();
std::vector<PhaseTime> profile(bool reset);

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  // May run on one of the pool's own workers (a job may hold the last reference to what owns the pool): that
  // worker is detached, the others joined.
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int threads() const { return static_cast<int>(workers_.size()); }
  // False in a process forked after the pool started: its threads exist only in the parent.
  bool alive() const;
  void submit(std::shared_ptr<Job> job);  // std::runtime_error when !alive()

 private:
  // What the workers use; they share its ownership, so a worker detached by the destructor outlives the pool safely.
  std::shared_ptr<PoolState> state_;
  std::vector<std::thread> workers_;
};

}  // namespace kt
