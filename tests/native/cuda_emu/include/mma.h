// Shim for the CUDA emulator (see ../emu.h): nvcuda::wmma for 16x16x16 tiles. Every lane holds the
// whole fragment, which the kernels cannot tell apart from the hardware layout as long as they
// only fill, load, multiply and store fragments (the emulator offers nothing else). Loads and
// stores are warp-collective and check the documented rules: 256-bit aligned pointers, ldm a
// multiple of 8 elements for 16-bit types and of 4 for float.
#pragma once
#include "../emu.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has 16x16x16 fragments only");
  float v[16][16];  // [row][col] of the tile this fragment holds (A: M x K, B: K x N, C: M x N)
};

namespace detail {
inline float value(float x) { return x; }
inline float value(__half x) { return __half2float(x); }
inline float value(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
void check_operand(const T* ptr, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
    cdcl_emu::fail("wmma load/store: pointer not 256-bit aligned");
  if (ldm % (16 / sizeof(T)) != 0) cdcl_emu::fail("wmma load/store: ldm not a multiple of 16 bytes");
}

// Element (r, c) of a tile at ptr with leading dimension ldm.
template <typename T>
float at(const T* ptr, unsigned ldm, bool row_major_mem, int r, int c) {
  return value(row_major_mem ? ptr[size_t(r) * ldm + c] : ptr[size_t(c) * ldm + r]);
}
}  // namespace detail

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float x) {
  for (auto& row : f.v)
    for (float& e : row) e = x;
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* ptr, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  detail::check_operand(ptr, ldm);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = detail::at(ptr, ldm, std::is_same_v<Layout, row_major>, r, c);
  cdcl_emu::warp_sync();  // every lane has read before any lane goes on to overwrite the source
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* ptr,
                             unsigned ldm, layout_t layout) {
  detail::check_operand(ptr, ldm);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = detail::at(ptr, ldm, layout == mem_row_major, r, c);
  cdcl_emu::warp_sync();
}

// Each lane writes its share of the tile (every 32nd element): a reader that skips the
// __syncwarp a store needs sees the other lanes' shares missing.
inline void store_matrix_sync(float* ptr, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  detail::check_operand(ptr, ldm);
  cdcl_emu::warp_sync();  // collective: the whole warp takes part
  const int lane = int(threadIdx.x % 32);
  for (int e = lane; e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    (layout == mem_row_major ? ptr[size_t(r) * ldm + c] : ptr[size_t(c) * ldm + r]) = f.v[r][c];
  }
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];
      for (int kk = 0; kk < 16; ++kk) s += a.v[i][kk] * b.v[kk][j];
      out[i][j] = s;
    }
  std::memcpy(d.v, out, sizeof(out));
}

}  // namespace nvcuda::wmma
