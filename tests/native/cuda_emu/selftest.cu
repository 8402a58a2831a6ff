// Kernels that show the emulator's checks can fail: each either computes something the test
// checks, or breaks one rule of the execution model (a missing barrier, a barrier that only part
// of the block reaches, a misaligned WMMA pointer, too much shared memory without the opt-in).
// They are not part of the library; tests/native/test_cuda_emulated.py runs them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

namespace {

constexpr int THREADS = 128;

// out[0] = sum of x[0..THREADS), staged through shared memory, optionally without the barrier
// between the writes and the read.
__global__ void block_sum_kernel(const float* x, float* out, bool barrier) {
  extern __shared__ float staged[];
  staged[threadIdx.x] = x[threadIdx.x];
  if (barrier) __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int i = 0; i < THREADS; ++i) s += staged[i];
    out[0] = s;
  }
}

// out[w] = sum over warp w's lanes of x, by butterfly shuffles; any[w] = whether a lane's x > 0.
__global__ void warp_sum_kernel(const float* x, float* out, int* any) {
  float v = x[threadIdx.x];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int a = __any_sync(0xffffffffu, x[threadIdx.x] > 0.0f);
  if (threadIdx.x % 32 == 0) {
    out[threadIdx.x / 32] = v;
    any[threadIdx.x / 32] = a;
  }
}

// Only the first half of the block reaches the barrier.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < THREADS / 2) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// c (16 x 16, fp32) = a (16 x 16, fp16, row-major) . b (16 x 16, fp16, column-major), one warp;
// offset shifts the a tile by that many elements (a nonzero offset breaks the 256-bit alignment).
__global__ void wmma_kernel(const __half* a, const __half* b, float* c, int offset) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(128) __half a_s[16 * 16 + 16];
  for (int i = threadIdx.x; i < 256; i += 32) a_s[offset + i] = a[i];
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.0f);
  wmma::load_matrix_sync(fa, a_s + offset, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}

}  // namespace

extern "C" {

int cdcl_emu_selftest_block_sum(const float* x, float* out, int barrier) {
  block_sum_kernel<<<dim3(1), dim3(THREADS), THREADS * sizeof(float), nullptr>>>(x, out, barrier != 0);
  return cudaGetLastError();
}

int cdcl_emu_selftest_warp_sum(const float* x, float* out, int* any) {
  warp_sum_kernel<<<dim3(1), dim3(THREADS), 0, nullptr>>>(x, out, any);
  return cudaGetLastError();
}

int cdcl_emu_selftest_divergent_barrier(float* out) {
  divergent_barrier_kernel<<<dim3(1), dim3(THREADS), 0, nullptr>>>(out);
  return cudaGetLastError();
}

int cdcl_emu_selftest_wmma(const __half* a, const __half* b, float* c, int offset) {
  wmma_kernel<<<dim3(1), dim3(32), 0, nullptr>>>(a, b, c, offset);
  return cudaGetLastError();
}

// The emulator's 16-bit conversions, on the host: half_bits / bf16_bits get the bits of x rounded
// to fp16 / bf16, half_back / bf16_back the fp32 values of those bits.
void cdcl_emu_selftest_convert(const float* x, int64_t n, uint16_t* half_bits, uint16_t* bf16_bits,
                               float* half_back, float* bf16_back) {
  for (int64_t i = 0; i < n; ++i) {
    const __half h = __float2half_rn(x[i]);
    const __nv_bfloat16 b = __float2bfloat16_rn(x[i]);
    half_bits[i] = h.bits;
    bf16_bits[i] = b.bits;
    half_back[i] = __half2float(h);
    bf16_back[i] = __bfloat162float(b);
  }
}

// A launch asking for 64 KB of dynamic shared memory, with or without raising the limit first.
int cdcl_emu_selftest_smem_optin(const float* x, float* out, int opt_in) {
  const int bytes = 64 * 1024;
  if (opt_in) {
    const cudaError_t err =
        cudaFuncSetAttribute(block_sum_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err != cudaSuccess) return err;
  }
  block_sum_kernel<<<dim3(1), dim3(THREADS), bytes, nullptr>>>(x, out, true);
  const cudaError_t err = cudaGetLastError();
  if (opt_in)  // restore the default for the next call
    cudaFuncSetAttribute(block_sum_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 48 * 1024);
  return err;
}

}  // extern "C"
