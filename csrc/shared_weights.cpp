#include "shared_weights.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <thread>

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace kt {

namespace {

constexpr uint64_t kMagic = 0x6b745f7368617265ull;  // "kt_share"
constexpr uint64_t kVersion = 1;
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kDataOffset = kHugePage;  // the data starts on a huge-page boundary of the file
constexpr size_t kHeaderBytes = 4096;
enum State : int32_t { kPacking = 0, kReady = 1, kFailed = 2 };

uint64_t pid_namespace() {
  struct stat st;
  return stat("/proc/self/ns/pid", &st) == 0 ? static_cast<uint64_t>(st.st_ino) : 0;
}

bool process_gone(int64_t pid) { return pid > 0 && kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH; }

std::string describe(const std::string& layer, const std::string& name) {
  return "kt_patch: " + layer + ": shared expert weights /dev/shm/" + name + ": ";
}

[[noreturn]] void fail(const std::string& layer, const std::string& name, const std::string& what) {
  throw std::runtime_error(describe(layer, name) + what);
}

std::string errno_text() { return std::strerror(errno); }

}  // namespace

struct SegmentHeader {
  std::atomic<uint64_t> magic;  // kMagic once the fields below are written (release)
  uint64_t version;
  uint64_t data_bytes;
  uint64_t fingerprint;  // the layer's shapes, dtype and packing: an opener of another layout refuses it
  int64_t creator_pid;
  uint64_t pid_ns;
  std::atomic<int32_t> state;
  std::atomic<int32_t> attached;  // ranks that mapped the weights, the creator included
  std::atomic<int32_t> unlinked;
  int32_t ranks;
  char error[1024];
};
static_assert(sizeof(SegmentHeader) <= kHeaderBytes, "the header fits its page");
static_assert(std::atomic<int32_t>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free,
              "atomics in shared memory must be lock-free");

namespace {

// Reserves address space for the header page and the data so that the data lands on a huge-page boundary (the
// shared pages can then be huge pages where the system allows it for shmem), and maps both from fd.
struct Mapping {
  void* base = nullptr;
  size_t total = 0;
  SegmentHeader* header = nullptr;
  char* data = nullptr;
};

Mapping map_segment(int fd, size_t bytes, bool writable_data, const std::string& layer, const std::string& name) {
  Mapping m;
  m.total = bytes + 2 * kHugePage;
  m.base = mmap(nullptr, m.total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m.base == MAP_FAILED) fail(layer, name, "cannot reserve address space: " + errno_text());
  const uintptr_t aligned = (reinterpret_cast<uintptr_t>(m.base) + 2 * kHugePage - 1) & ~(kHugePage - 1);
  char* data = reinterpret_cast<char*>(aligned);
  void* header = mmap(data - kDataOffset, kHeaderBytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
  void* mapped = bytes == 0 ? data
                            : mmap(data, bytes, writable_data ? PROT_READ | PROT_WRITE : PROT_READ,
                                   MAP_SHARED | MAP_FIXED, fd, kDataOffset);
  if (header == MAP_FAILED || mapped == MAP_FAILED) {
    const std::string why = errno_text();
    munmap(m.base, m.total);
    fail(layer, name, "cannot map it: " + why);
  }
#if defined(MADV_HUGEPAGE)
  if (bytes >= kHugePage) madvise(data, bytes, MADV_HUGEPAGE);  // advice: shmem huge pages need shmem_enabled
#endif
  m.header = static_cast<SegmentHeader*>(header);
  m.data = data;
  return m;
}

}  // namespace

std::unique_ptr<SharedSegment> SharedSegment::create(const SharedSpec& spec, size_t bytes, uint64_t fingerprint,
                                                     const std::string& layer) {
  const std::string& name = spec.name;
  const std::string path = "/" + name;
  shm_unlink(path.c_str());  // a stale segment of this name (a crashed earlier job): this job's is made anew
  const int fd = shm_open(path.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) fail(layer, name, "cannot create it: " + errno_text());
  // Allocate every page now: a /dev/shm too small for the weights is an error here, not a SIGBUS while packing.
  const int err = posix_fallocate(fd, 0, static_cast<off_t>(kDataOffset + bytes));
  if (err != 0) {
    close(fd);
    shm_unlink(path.c_str());
    fail(layer, name,
         "cannot allocate " + std::to_string(bytes >> 20) + " MiB in /dev/shm (" + std::strerror(err) +
             "): enlarge /dev/shm (docker: --shm-size) or set share_weights=off (KT_SHARE_WEIGHTS=off)");
  }
  Mapping m;
  try {
    m = map_segment(fd, bytes, true, layer, name);
  } catch (...) {
    close(fd);
    shm_unlink(path.c_str());
    throw;
  }
  close(fd);
  std::unique_ptr<SharedSegment> s(new SharedSegment());
  s->name_ = name;
  s->creator_ = true;
  s->header_ = m.header;
  s->data_ = m.data;
  s->bytes_ = bytes;
  s->map_ = m.base;
  s->map_bytes_ = m.total;
  SegmentHeader& h = *m.header;
  h.version = kVersion;
  h.data_bytes = bytes;
  h.fingerprint = fingerprint;
  h.creator_pid = getpid();
  h.pid_ns = pid_namespace();
  h.ranks = spec.ranks;
  h.state.store(kPacking);
  h.attached.store(1);
  h.unlinked.store(0);
  h.magic.store(kMagic, std::memory_order_release);
  return s;
}

std::unique_ptr<SharedSegment> SharedSegment::open(const SharedSpec& spec, size_t bytes, uint64_t fingerprint,
                                                   const std::string& layer) {
  const std::string& name = spec.name;
  const std::string path = "/" + name;
  using clock = std::chrono::steady_clock;
  const auto deadline = clock::now() + std::chrono::duration<double>(spec.timeout_s);
  auto pause = std::chrono::milliseconds(1);
  const char* seen = "it was never created";
  std::string dead_creator;
  for (;;) {
    const int fd = shm_open(path.c_str(), O_RDWR, 0);
    if (fd < 0 && errno != ENOENT) fail(layer, name, "cannot open it: " + errno_text());
    if (fd >= 0) {
      struct stat st;
      const bool sized = fstat(fd, &st) == 0 && static_cast<size_t>(st.st_size) >= kDataOffset + bytes;
      if (sized) {
        void* hp = mmap(nullptr, kHeaderBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (hp == MAP_FAILED) {
          close(fd);
          fail(layer, name, "cannot map its header: " + errno_text());
        }
        auto* h = static_cast<SegmentHeader*>(hp);
        std::string error;
        int state = -1;
        if (h->magic.load(std::memory_order_acquire) == kMagic) {
          if (h->version != kVersion || h->data_bytes != bytes || h->fingerprint != fingerprint) {
            error = "it holds another layout (" + std::to_string(h->data_bytes) + " bytes, fingerprint " +
                    std::to_string(h->fingerprint) + "; this rank expects " + std::to_string(bytes) + ", " +
                    std::to_string(fingerprint) + "): every local rank must load the same model with the same "
                    "options";
          } else {
            state = h->state.load(std::memory_order_acquire);
            seen = "local rank 0 is still packing it";
            if (state == kFailed) {
              error = "local rank 0 failed while packing it: " + std::string(h->error, strnlen(h->error, sizeof h->error));
            } else if (process_gone(h->creator_pid)) {
              // Left by a creator that exited: a crashed earlier job of the same name, or this job's local rank 0
              // died (then the launcher stops the job, or the timeout below ends the wait). Never mapped: removed.
              state = -1;
              dead_creator = "a segment of that name whose creator (pid " + std::to_string(h->creator_pid) +
                             ") had exited was removed; ";
              if (h->unlinked.exchange(1) == 0) shm_unlink(path.c_str());
            }
          }
        }
        if (!error.empty()) {
          munmap(hp, kHeaderBytes);
          close(fd);
          fail(layer, name, error);
        }
        if (state == kReady) {
          munmap(hp, kHeaderBytes);
          Mapping m;
          try {
            m = map_segment(fd, bytes, false, layer, name);
          } catch (...) {
            close(fd);
            throw;
          }
          close(fd);
          std::unique_ptr<SharedSegment> s(new SharedSegment());
          s->name_ = name;
          s->header_ = m.header;
          s->data_ = m.data;
          s->bytes_ = bytes;
          s->map_ = m.base;
          s->map_bytes_ = m.total;
          if (m.header->attached.fetch_add(1) + 1 >= m.header->ranks) s->unlink_once();  // the last to map it
          return s;
        }
        munmap(hp, kHeaderBytes);
      } else {
        seen = "local rank 0 is still allocating it";
      }
      close(fd);
    }
    if (clock::now() >= deadline)
      fail(layer, name,
           "timed out after " + std::to_string(static_cast<int>(spec.timeout_s)) + " s waiting for local rank 0 to "
           "create and pack it (" + dead_creator + seen + "; the wait is the peer_timeout option, "
           "KT_PEER_TIMEOUT; share_weights=off gives each rank its own copy)");
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(50));
  }
}

void SharedSegment::mark_ready() { header_->state.store(kReady, std::memory_order_release); }

void SharedSegment::mark_failed(const std::string& why) {
  std::strncpy(header_->error, why.c_str(), sizeof header_->error - 1);
  header_->state.store(kFailed, std::memory_order_release);
}

void SharedSegment::unlink_once() {
  if (header_ && header_->unlinked.exchange(1) == 0) shm_unlink(("/" + name_).c_str());
}

SharedSegment::~SharedSegment() {
  if (creator_ && header_) {
    // Normally the last rank to map it has unlinked it already. Else give the others a few seconds (a rebuilt layer:
    // they map the old segment in the same order), then remove the name anyway so that nothing stays behind.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (header_->state.load() == kReady && header_->unlinked.load() == 0 &&
           header_->attached.load() < header_->ranks && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    unlink_once();
  }
  if (map_) munmap(map_, map_bytes_);
}

int SharedSegment::remove_stale(const std::string& prefix) {
  DIR* dir = opendir("/dev/shm");
  if (!dir) return 0;
  int removed = 0;
  const uint64_t ns = pid_namespace();
  while (dirent* entry = readdir(dir)) {
    const std::string name = entry->d_name;
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string path = "/" + name;
    const int fd = shm_open(path.c_str(), O_RDONLY, 0);
    if (fd < 0) continue;
    struct stat st;
    if (fstat(fd, &st) == 0 && st.st_uid == getuid() && static_cast<size_t>(st.st_size) >= kHeaderBytes) {
      void* hp = mmap(nullptr, kHeaderBytes, PROT_READ, MAP_SHARED, fd, 0);
      if (hp != MAP_FAILED) {
        const auto* h = static_cast<const SegmentHeader*>(hp);
        if (h->magic.load() == kMagic && h->pid_ns == ns && process_gone(h->creator_pid) &&
            shm_unlink(path.c_str()) == 0)
          ++removed;
        munmap(hp, kHeaderBytes);
      }
    }
    close(fd);
  }
  closedir(dir);
  return removed;
}

}  // namespace kt
