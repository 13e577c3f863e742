// A layer's packed weights in one POSIX shared-memory segment, for every local rank of a host (SPEC §8: one host
// copy of the experts whatever the number of ranks). The host's local rank 0 creates the segment, packs into it and
// marks it ready; the other local ranks wait for that (bounded), map the weights read-only and count themselves in.
// The last one to map it unlinks its name, so nothing stays in /dev/shm once every rank holds its mapping.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace kt {

// How a layer takes part: no name, no sharing (the weights are the process's own memory).
struct SharedSpec {
  std::string name;        // shm_open name without the leading '/'
  bool create = false;     // local rank 0: creates and packs; the others open
  int ranks = 1;           // local ranks that map it (the creator included)
  double timeout_s = 600;  // how long an opener waits for the creator to have packed
};

struct SegmentHeader;

class SharedSegment {
 public:
  // Creator: a fresh segment of `bytes` (a stale one of that name is removed first), mapped read-write, not ready.
  static std::unique_ptr<SharedSegment> create(const SharedSpec& spec, size_t bytes, uint64_t fingerprint,
                                               const std::string& layer);
  // Opener: waits until the segment exists and is ready (or its creator failed, died or the timeout passed: then
  // an error naming the layer and the segment), maps it read-only and counts itself in.
  static std::unique_ptr<SharedSegment> open(const SharedSpec& spec, size_t bytes, uint64_t fingerprint,
                                             const std::string& layer);
  ~SharedSegment();
  SharedSegment(const SharedSegment&) = delete;
  SharedSegment& operator=(const SharedSegment&) = delete;

  char* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  bool creator() const { return creator_; }
  const std::string& name() const { return name_; }
  void mark_ready();                          // creator, once packed: the openers may map it
  void mark_failed(const std::string& why);  // creator, on an error while packing: the openers raise it

  // Segments of this prefix left in /dev/shm by creators that are gone (killed before every rank mapped theirs):
  // removed when they belong to this user and pid namespace. Returns how many.
  static int remove_stale(const std::string& prefix);

 private:
  SharedSegment() = default;
  void unlink_once();

  std::string name_;
  bool creator_ = false;
  SegmentHeader* header_ = nullptr;
  char* data_ = nullptr;
  size_t bytes_ = 0;
  void* map_ = nullptr;  // the whole reservation (header page + huge-page aligned data)
  size_t map_bytes_ = 0;
};

}  // namespace kt
