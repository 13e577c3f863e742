// The optional parts of a backend's Ops (see scalar.cpp), for backends that have neither matrix tiles nor faster
// transposes; include inside the backend's anonymous namespace and derive Ops from it.
struct PortableExtras {
  static constexpr bool kTilesTakeAllRows = false;
  static constexpr bool kPairedOuterProducts = false;
  template <class T>
  static int gemm_tiles(const T*, size_t, int, int, const T*, size_t, int, float*, size_t, bool) {
    return 0;
  }
  static bool transpose_words(const uint64_t*, uint64_t*) { return false; }
  static bool transpose_floats(const float*, size_t, float*, size_t) { return false; }
};
