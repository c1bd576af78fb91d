// CUDA align (contract "align"), torch-free: raw pointers, sizes and a stream behind an extern "C"
// launcher, so it compiles with plain nvcc on machines whose PyTorch has no CUDA headers.
//
// Two kernels: (1) a grid-wide histogram of slots with atomics (order does not matter for counts);
// (2) one block that scans the padded counts into run offsets and then scatters the pairs in order,
// a chunk of blockDim pairs at a time, ranking each pair among the earlier pairs of its chunk with the
// same slot. Walking chunks in order is what makes the result stable (identical to the CPU op).
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kScatterThreads = 256;

template <typename SlotT>
__global__ void count_slots_kernel(const SlotT* __restrict__ slots, int64_t num_pairs, int64_t num_slots,
                                   int32_t* __restrict__ counts) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < num_pairs;
       p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t s = static_cast<int64_t>(slots[p]);
    if (s >= 0 && s < num_slots) atomicAdd(counts + s, 1);
  }
}

template <typename SlotT>
__global__ void __launch_bounds__(kScatterThreads)
scan_scatter_kernel(const SlotT* __restrict__ slots, int64_t num_pairs, int64_t num_slots, int32_t block_m,
                    int32_t* __restrict__ counts, int32_t* __restrict__ sorted_ids,
                    int32_t* __restrict__ block_slot, int64_t p_max, int32_t* __restrict__ num_padded) {
  __shared__ int32_t partial[kScatterThreads];
  __shared__ int32_t chunk_slot[kScatterThreads];
  const int tid = threadIdx.x;
  const int32_t sentinel = static_cast<int32_t>(num_pairs);

  for (int64_t i = tid; i < p_max; i += kScatterThreads) sorted_ids[i] = sentinel;
  for (int64_t i = tid; i < p_max / block_m; i += kScatterThreads) block_slot[i] = -1;

  // Exclusive scan of padded counts: each thread owns a contiguous range of slots.
  const int64_t per_thread = (num_slots + kScatterThreads - 1) / kScatterThreads;
  const int64_t s_begin = tid * per_thread;
  const int64_t s_end = s_begin + per_thread < num_slots ? s_begin + per_thread : num_slots;
  int32_t own = 0;
  for (int64_t s = s_begin; s < s_end; ++s) own += (counts[s] + block_m - 1) / block_m * block_m;
  partial[tid] = own;
  __syncthreads();
  for (int offset = 1; offset < kScatterThreads; offset <<= 1) {  // Hillis-Steele inclusive scan
    const int32_t add = tid >= offset ? partial[tid - offset] : 0;
    __syncthreads();
    partial[tid] += add;
    __syncthreads();
  }
  int32_t run = partial[tid] - own;
  for (int64_t s = s_begin; s < s_end; ++s) {
    const int32_t padded = (counts[s] + block_m - 1) / block_m * block_m;
    counts[s] = run;  // counts now holds the next free position of each slot's run
    run += padded;
  }
  if (tid == kScatterThreads - 1) *num_padded = partial[tid];
  __syncthreads();

  for (int64_t base = 0; base < num_pairs; base += kScatterThreads) {
    const int64_t p = base + tid;
    int32_t s = -1;
    if (p < num_pairs) {
      const int64_t raw = static_cast<int64_t>(slots[p]);
      if (raw >= 0 && raw < num_slots) s = static_cast<int32_t>(raw);
    }
    chunk_slot[tid] = s;
    __syncthreads();
    int32_t rank = 0, total = 0;
    for (int j = 0; j < kScatterThreads; ++j) {
      const int match = chunk_slot[j] == s;
      total += match;
      rank += match & (j < tid);
    }
    int32_t start = 0;
    if (s >= 0) {
      start = counts[s];
      const int32_t dest = start + rank;
      sorted_ids[dest] = static_cast<int32_t>(p);
      block_slot[dest / block_m] = s;  // every block inside num_padded holds a real pair
    }
    __syncthreads();  // all lanes read counts before the last of each slot advances it
    if (s >= 0 && rank == total - 1) counts[s] = start + total;
    __syncthreads();
  }
}

template <typename SlotT>
cudaError_t launch(const SlotT* slots, int64_t num_pairs, int64_t num_slots, int32_t block_m, int32_t* counts,
                   int32_t* sorted_ids, int32_t* block_slot, int64_t p_max, int32_t* num_padded,
                   cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(counts, 0, sizeof(int32_t) * num_slots, stream);
  if (err != cudaSuccess) return err;
  if (num_pairs > 0) {
    const int threads = 256;
    int64_t blocks = (num_pairs + threads - 1) / threads;
    if (blocks > 1024) blocks = 1024;
    count_slots_kernel<SlotT><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(slots, num_pairs,
                                                                                     num_slots, counts);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  scan_scatter_kernel<SlotT><<<1, kScatterThreads, 0, stream>>>(slots, num_pairs, num_slots, block_m, counts,
                                                                sorted_ids, block_slot, p_max, num_padded);
  return cudaGetLastError();
}

}  // namespace

// slot_ids: device pointer to num_pairs int32 (slot_is_int64 == 0) or int64 values in [0, num_slots);
// out-of-range values are skipped (the torch binding validates nothing on the device to avoid a sync).
// counts: device workspace of num_slots int32. sorted_ids [p_max], block_slot [p_max / block_m],
// num_padded [1]: device outputs. p_max must be the contract's padded size. Returns a cudaError_t.
extern "C" int multimoe_align_cuda(const void* slot_ids, int slot_is_int64, int64_t num_pairs, int64_t num_slots,
                                   int32_t block_m, int32_t* counts, int32_t* sorted_ids, int32_t* block_slot,
                                   int64_t p_max, int32_t* num_padded, cudaStream_t stream) {
  if (block_m < 1 || num_slots < 1) return static_cast<int>(cudaErrorInvalidValue);
  if (slot_is_int64)
    return static_cast<int>(launch(static_cast<const int64_t*>(slot_ids), num_pairs, num_slots, block_m, counts,
                                   sorted_ids, block_slot, p_max, num_padded, stream));
  return static_cast<int>(launch(static_cast<const int32_t*>(slot_ids), num_pairs, num_slots, block_m, counts,
                                 sorted_ids, block_slot, p_max, num_padded, stream));
}
