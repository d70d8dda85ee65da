// qlorakit's caching arena for torch's CPU tensors (built and installed by qlorakit/train/arena.py).
//
// Requests of at least min_bytes are served from segments this arena maps itself (mmap, segment_bytes
// or the request if larger) and carved best fit: the smallest free block of at least the request (rounded up
// to a 4 KiB page), split, the rest staying free. A freed block merges with free neighbours of its segment
// and is kept for the next request; nothing goes back to the kernel until qlk_arena_trim() unmaps the
// segments that are wholly free (also before it gives up on a failed mmap). A training step repeats its
// requests, so after the first step they are served from pages already resident: no page faults, and no
// glibc heap between the blocks to fragment.
// Smaller requests go to the allocator that was installed before (torch's default, glibc's malloc).
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <utility>

namespace {
constexpr size_t kPage = 4096;

struct Block {
  size_t size;
  char* segment;  // base of the segment the block lies in (neighbours merge only within one)
  bool free;
};

struct Arena final : public c10::Allocator {
  c10::Allocator* fallback = nullptr;
  c10::DeleterFnPtr fallback_raw = nullptr;
  size_t min_bytes = 0, segment_bytes = 0;
  std::mutex mu;
  std::map<char*, Block> blocks;                // every block, by address
  std::set<std::pair<size_t, char*>> free_set;  // the free blocks by (size, address): best fit, lowest address
  std::map<char*, size_t> segments;             // base -> size
  size_t live = 0, mapped = 0, peak_live = 0, peak_mapped = 0;
  uint64_t hits = 0, misses = 0;

  static void release_fn(void* ptr);

  // Lock held; `it` a free block of at least `size` bytes.
  char* carve(std::map<char*, Block>::iterator it, size_t size) {
    char* ptr = it->first;
    Block& block = it->second;
    free_set.erase({block.size, ptr});
    if (block.size > size) {
      blocks.emplace(ptr + size, Block{block.size - size, block.segment, true});
      free_set.insert({block.size - size, ptr + size});
      block.size = size;
    }
    block.free = false;
    live += size;
    peak_live = std::max(peak_live, live);
    return ptr;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < min_bytes) return fallback->allocate(nbytes);
    size_t size = (nbytes + kPage - 1) / kPage * kPage;
    char* ptr = nullptr;
    {
      std::lock_guard<std::mutex> guard(mu);
      auto fit = free_set.lower_bound({size, nullptr});
      if (fit != free_set.end()) {
        ptr = carve(blocks.find(fit->second), size);
        hits++;
      }
    }
    if (ptr == nullptr) {
      size_t span = std::max(size, segment_bytes);
      void* base = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (base == MAP_FAILED && trim() > 0) {  // give the wholly free segments back, then try once more
        base = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      }
      TORCH_CHECK(base != MAP_FAILED, "qlorakit arena: mmap of ", span, " bytes failed (out of memory)");
      std::lock_guard<std::mutex> guard(mu);
      char* segment = static_cast<char*>(base);
      segments[segment] = span;
      mapped += span;
      peak_mapped = std::max(peak_mapped, mapped);
      auto it = blocks.emplace(segment, Block{span, segment, true}).first;
      free_set.insert({span, segment});
      ptr = carve(it, size);
      misses++;
    }
    return {ptr, ptr, &Arena::release_fn, c10::Device(c10::DeviceType::CPU)};
  }

  void release(void* raw) {
    char* ptr = static_cast<char*>(raw);
    {
      std::lock_guard<std::mutex> guard(mu);
      auto it = blocks.find(ptr);
      if (it != blocks.end()) {
        Block& block = it->second;
        block.free = true;
        live -= block.size;
        auto next = std::next(it);
        if (next != blocks.end() && next->second.free && next->second.segment == block.segment) {
          free_set.erase({next->second.size, next->first});
          block.size += next->second.size;
          blocks.erase(next);
        }
        if (it != blocks.begin()) {
          auto prev = std::prev(it);
          if (prev->second.free && prev->second.segment == block.segment) {
            free_set.erase({prev->second.size, prev->first});
            prev->second.size += block.size;
            blocks.erase(it);
            it = prev;
          }
        }
        free_set.insert({it->second.size, it->first});
        return;
      }
    }
    fallback_raw(raw);  // a small block, from the allocator before this one
  }

  size_t trim() {
    std::lock_guard<std::mutex> guard(mu);
    size_t released = 0;
    for (auto seg = segments.begin(); seg != segments.end();) {
      auto it = blocks.find(seg->first);
      if (it->second.free && it->second.size == seg->second) {
        free_set.erase({it->second.size, it->first});
        blocks.erase(it);
        munmap(seg->first, seg->second);
        mapped -= seg->second;
        released += seg->second;
        seg = segments.erase(seg);
      } else {
        ++seg;
      }
    }
    return released;
  }

  c10::DeleterFnPtr raw_deleter() const override { return &Arena::release_fn; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

Arena* g_arena = nullptr;  // never destroyed: tensors may outlive any scope
void Arena::release_fn(void* ptr) { g_arena->release(ptr); }
}  // namespace

// Make the arena torch's CPU allocator; 1 if installed now, 0 if it already was.
extern "C" int qlk_arena_install(int64_t min_bytes, int64_t segment_bytes) {
  if (g_arena != nullptr) return 0;
  auto* arena = new Arena();
  arena->fallback = c10::GetCPUAllocator();
  arena->fallback_raw = arena->fallback->raw_deleter();
  arena->min_bytes = static_cast<size_t>(min_bytes);
  arena->segment_bytes = static_cast<size_t>(segment_bytes);
  g_arena = arena;
  c10::SetCPUAllocator(arena, /*priority=*/100);
  return 1;
}

// out[0..5]: live bytes, mapped bytes, peak live, peak mapped, requests served from free blocks, segments mapped.
extern "C" void qlk_arena_stats(int64_t* out) {
  if (g_arena == nullptr) return;
  std::lock_guard<std::mutex> guard(g_arena->mu);
  out[0] = static_cast<int64_t>(g_arena->live);
  out[1] = static_cast<int64_t>(g_arena->mapped);
  out[2] = static_cast<int64_t>(g_arena->peak_live);
  out[3] = static_cast<int64_t>(g_arena->peak_mapped);
  out[4] = static_cast<int64_t>(g_arena->hits);
  out[5] = static_cast<int64_t>(g_arena->misses);
}

// Unmap the segments that hold no live block; returns the bytes given back.
extern "C" int64_t qlk_arena_trim() { return g_arena == nullptr ? 0 : static_cast<int64_t>(g_arena->trim()); }
