// CPU align op (contract "align"): sort (token, k) pairs by slot, stable within a slot, pad each
// slot's run to a multiple of block_m with the sentinel T*K.
#include "align.h"

#include <algorithm>
#include <vector>

namespace multimoe_rt {

int64_t align_padded_size(int64_t num_pairs, int64_t num_slots, int64_t block_m) {
  const int64_t worst = num_pairs + std::min(num_pairs, num_slots) * (block_m - 1);
  return (worst + block_m - 1) / block_m * block_m;
}

template <typename SlotT>
static void align_impl(const SlotT* slots, int64_t num_pairs, int64_t num_slots, int64_t block_m,
                       int32_t* sorted_ids, int32_t* block_slot, int64_t p_max, int32_t* num_padded) {
  std::vector<int64_t> start(num_slots + 1, 0);
  for (int64_t p = 0; p < num_pairs; ++p) {
    const int64_t s = static_cast<int64_t>(slots[p]);
    TORCH_CHECK(s >= 0 && s < num_slots, "multimoe_rt::align_cpu: slot_ids[", p, "] = ", s,
                " is outside [0, ", num_slots, ")");
    start[s + 1] += 1;
  }
  // Exclusive scan of padded counts; a second cursor array keeps stability (pairs visited in order).
  for (int64_t s = 0; s < num_slots; ++s)
    start[s + 1] = start[s] + (start[s + 1] + block_m - 1) / block_m * block_m;
  const int64_t total = start[num_slots];
  const int32_t sentinel = static_cast<int32_t>(num_pairs);
  std::fill(sorted_ids, sorted_ids + p_max, sentinel);
  std::fill(block_slot, block_slot + p_max / block_m, -1);
  for (int64_t s = 0; s < num_slots; ++s)
    for (int64_t b = start[s] / block_m; b < start[s + 1] / block_m; ++b) block_slot[b] = static_cast<int32_t>(s);
  std::vector<int64_t> cursor(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < num_pairs; ++p) sorted_ids[cursor[static_cast<int64_t>(slots[p])]++] = static_cast<int32_t>(p);
  *num_padded = static_cast<int32_t>(total);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> align_cpu(const at::Tensor& slot_ids, int64_t num_slots,
                                                         int64_t block_m) {
  TORCH_CHECK(slot_ids.dim() == 2, "multimoe_rt::align_cpu: slot_ids must be [T, K], got ", slot_ids.sizes());
  TORCH_CHECK(slot_ids.device().is_cpu(), "multimoe_rt::align_cpu: slot_ids must be on CPU, got ",
              slot_ids.device());
  TORCH_CHECK(slot_ids.scalar_type() == at::kInt || slot_ids.scalar_type() == at::kLong,
              "multimoe_rt::align_cpu: slot_ids must be int32 or int64, got ", slot_ids.scalar_type());
  TORCH_CHECK(num_slots >= 1 && block_m >= 1, "multimoe_rt::align_cpu: num_slots (", num_slots,
              ") and block_m (", block_m, ") must be >= 1");
  const int64_t num_pairs = slot_ids.numel();
  TORCH_CHECK(num_pairs < (int64_t{1} << 31) - 1, "multimoe_rt::align_cpu: too many pairs for int32 ids");
  const int64_t p_max = align_padded_size(num_pairs, num_slots, block_m);
  auto opts = slot_ids.options().dtype(at::kInt);
  at::Tensor sorted_ids = at::empty({p_max}, opts);
  at::Tensor block_slot = at::empty({p_max / block_m}, opts);
  at::Tensor num_padded = at::empty({1}, opts);
  at::Tensor flat = slot_ids.contiguous();
  if (flat.scalar_type() == at::kInt)
    align_impl(flat.data_ptr<int32_t>(), num_pairs, num_slots, block_m, sorted_ids.data_ptr<int32_t>(),
               block_slot.data_ptr<int32_t>(), p_max, num_padded.data_ptr<int32_t>());
  else
    align_impl(flat.data_ptr<int64_t>(), num_pairs, num_slots, block_m, sorted_ids.data_ptr<int32_t>(),
               block_slot.data_ptr<int32_t>(), p_max, num_padded.data_ptr<int32_t>());
  return {sorted_ids, block_slot, num_padded};
}

}  // namespace multimoe_rt
