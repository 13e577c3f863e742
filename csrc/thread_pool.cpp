#include "thread_pool.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define KT_CPU_RELAX() _mm_pause()
#else
#define KT_CPU_RELAX() std::this_thread::yield()
#endif

#include <pthread.h>

#include <algorithm>
#include <map>
#include <stdexcept>

namespace kt {

namespace {
// The error of a pool, or of a job submitted to one, in a child process forked after the pool's threads started.
const char* const kForkedPoolMessage =
    "kt_patch: the CPU kernel's thread pool does not survive fork(): this process is a fork of one whose kernel "
    "threads had started, and they do not exist here. Use the 'spawn' (or 'forkserver') multiprocessing start "
    "method, or create the kernel in the child";

std::atomic<bool> g_profiling{false};
std::mutex g_profile_mu;
std::map<std::string, std::pair<double, long>> g_profile;

// fork() children this process image descends from, counted in the child: a pool or a job made before the last
// fork belongs to threads that are not here.
std::atomic<uint64_t> g_forks{0};
}  // namespace

void set_profiling(bool on) { g_profiling.store(on); }
bool profiling_enabled() { return g_profiling.load(std::memory_order_relaxed); }

std::vector<PhaseTime> profile(bool reset) {
  std::lock_guard<std::mutex> lock(g_profile_mu);
  std::vector<PhaseTime> out;
  for (const auto& [name, v] : g_profile) out.push_back({name, v.first, v.second});
  if (reset) g_profile.clear();
  return out;
}

void Job::check_not_orphaned() const {
  if (forks_at_submit_ != g_forks.load()) throw std::runtime_error(kForkedPoolMessage);
}

void Job::wait() {
  check_not_orphaned();
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return done_; });
  if (error_) std::rethrow_exception(error_);
}

bool Job::wait_for(std::chrono::milliseconds timeout) {
  check_not_orphaned();
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, timeout, [this] { return done_; });
}

struct PoolState {
  int threads = 0;
  uint64_t forks = 0;  // g_forks when the threads started

  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::shared_ptr<Job>> queue;
  bool stop = false;

  // Shared state of the job being run.
  std::shared_ptr<Job> current;
  uint64_t generation = 0;  // bumped per job (and at stop) so sleeping workers know there is news
  std::atomic<size_t> next_item{0};
  std::atomic<size_t> item_count{0};
  std::atomic<int> arrived{0};
  std::atomic<uint64_t> barrier_epoch{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mu;

  void worker_main(int id);
  void run_job(Job& job, int id);
  void barrier();
  void record_error() {
    std::lock_guard<std::mutex> lock(error_mu);
    if (!error) error = std::current_exception();
    failed = true;
  }
};

// -------------------------------------------------------------------------------------------------- fork()
// Only the forking thread exists in a child. The mutexes a child may still take (the pools' and the profile's) are
// held across fork(), so that none is copied locked mid-update by a worker; the child then counts the fork, which
// marks every pool and every job submitted before it as dead.
namespace {
std::mutex g_pools_mu;
std::vector<PoolState*> g_pools;

void before_fork() {
  g_pools_mu.lock();
  for (PoolState* s : g_pools) s->mu.lock();
  g_profile_mu.lock();
}
void after_fork_in_parent() {
  g_profile_mu.unlock();
  for (PoolState* s : g_pools) s->mu.unlock();
  g_pools_mu.unlock();
}
void after_fork_in_child() {
  g_forks.fetch_add(1);
  after_fork_in_parent();
}

void register_pool(PoolState* s) {
  static std::once_flag once;
  std::call_once(once, [] { pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child); });
  std::lock_guard<std::mutex> lock(g_pools_mu);
  g_pools.push_back(s);
}
void unregister_pool(PoolState* s) {
  std::lock_guard<std::mutex> lock(g_pools_mu);
  g_pools.erase(std::remove(g_pools.begin(), g_pools.end(), s), g_pools.end());
}
}  // namespace

// -------------------------------------------------------------------------------------------------- the pool
ThreadPool::ThreadPool(int threads) : state_(std::make_shared<PoolState>()) {
  state_->threads = std::max(threads, 1);
  state_->forks = g_forks.load();
  register_pool(state_.get());
  for (int i = 0; i < state_->threads; ++i) workers_.emplace_back([s = state_, i] { s->worker_main(i); });
}

ThreadPool::~ThreadPool() {
  unregister_pool(state_.get());
  if (!alive()) {
    // A fork child: the threads are the parent's. Joining them would wait forever and destroying a joinable
    // std::thread terminates, so their handles (and the state they would share) are left behind.
    new std::vector<std::thread>(std::move(workers_));
    new std::shared_ptr<PoolState>(std::move(state_));
    return;
  }
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->stop = true;
    ++state_->generation;
  }
  state_->cv.notify_all();
  for (auto& w : workers_) {
    if (w.get_id() == std::this_thread::get_id())
      w.detach();  // it returns from the job that dropped the pool, sees stop, and exits
    else
      w.join();
  }
}

bool ThreadPool::alive() const { return state_->forks == g_forks.load(); }

void ThreadPool::submit(std::shared_ptr<Job> job) {
  if (!alive()) throw std::runtime_error(kForkedPoolMessage);
  job->forks_at_submit_ = state_->forks;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->queue.push_back(std::move(job));
  }
  state_->cv.notify_all();
}

// Workers meet here between phases. Phases are short (milliseconds), so waiting spins with a pause and then
// yields; between jobs workers sleep on the condition variable instead.
void PoolState::barrier() {
  const uint64_t epoch = barrier_epoch.load(std::memory_order_acquire);
  if (arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == threads) {
    arrived.store(0, std::memory_order_relaxed);
    barrier_epoch.fetch_add(1, std::memory_order_acq_rel);
    return;
  }
  for (int spin = 0; barrier_epoch.load(std::memory_order_acquire) == epoch; ++spin) {
    if (spin < 4096) {
      KT_CPU_RELAX();
    } else {
      std::this_thread::yield();
    }
  }
}

// A failed or cancelled job runs no further prepare or item; its remaining phases pass through the barriers empty.
void PoolState::run_job(Job& job, int id) {
  const bool timed = id == 0 && profiling_enabled();
  auto stopped = [&] { return failed.load(std::memory_order_relaxed) || job.cancelled(); };
  for (int phase = 0; phase < job.num_phases(); ++phase) {
    const auto start = std::chrono::steady_clock::now();
    if (id == 0) {
      size_t count = 0;
      if (!stopped()) {
        try {
          count = job.prepare(phase);
        } catch (...) {
          record_error();
        }
      }
      item_count.store(count, std::memory_order_relaxed);
      next_item.store(0, std::memory_order_release);
    }
    barrier();
    const size_t count = item_count.load(std::memory_order_relaxed);
    for (size_t item; !stopped() && (item = next_item.fetch_add(1, std::memory_order_acq_rel)) < count;) {
      try {
        job.run(phase, item, id);
      } catch (...) {
        record_error();
      }
    }
    barrier();
    if (timed && job.phase_name(phase)) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::lock_guard<std::mutex> lock(g_profile_mu);
      auto& slot = g_profile[job.phase_name(phase)];
      slot.first += s;
      slot.second += 1;
    }
  }
}

void PoolState::worker_main(int id) {
  uint64_t seen = 0;
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mu);
      if (id == 0) {
        cv.wait(lock, [this] { return stop || !queue.empty(); });
        // Stopped by the pool's destructor, which also bumped the generation for the others. The queue is empty
        // then: a job holds what owns its pool.
        if (stop) return;
        current = queue.front();
        queue.pop_front();
        failed = false;
        error = nullptr;
        ++generation;
        seen = generation;
        job = current;
        lock.unlock();
        cv.notify_all();
      } else {
        cv.wait(lock, [this, seen] { return generation != seen; });
        seen = generation;
        if (stop) return;
        job = current;
      }
    }
    const auto started = std::chrono::steady_clock::now();
    run_job(*job, id);
    if (id == 0) {
      {
        std::lock_guard<std::mutex> lock(mu);
        current.reset();  // the job (and what it holds) dies with its last user, not with the next job
      }
      const bool completed = !failed.load() && !job->cancelled();
      try {
        job->finish(completed);
      } catch (...) {
        if (!error) error = std::current_exception();
      }
      if (!error && job->cancelled())
        error = std::make_exception_ptr(std::runtime_error("kt_patch: the job was cancelled (interrupted)"));
      std::lock_guard<std::mutex> lock(job->mu_);
      job->error_ = error;
      job->run_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
      job->done_ = true;
      job->cv_.notify_all();
    }
  }
}

}  // namespace kt
