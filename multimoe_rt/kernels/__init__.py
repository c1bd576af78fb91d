"""Triton kernels of multimoe_rt, installed as the subpackage ``multimoe_rt.kernels``.

- ``align.align_triton``: sort (token, k) pairs by slab slot and pad each slot's run to BLOCK_M.
- ``grouped_gemm.fused_moe_triton``: align + grouped GEMM up (fused activation) + grouped GEMM down
  + deterministic reduce over k, reading expert weights from the slab by slot.
- ``delta_gemm.fused_moe_delta_triton``: the same over expert ids that may be base slot + compressed delta.
- ``tiles``: the jit pieces both share (block rows and columns, tile loads, the gate/up step, the activation
  epilogue, the weighted stores, the reduce over k).

Importing this package does not import triton; the submodules do. To run the kernels on CPU tensors,
set ``TRITON_INTERPRET=1`` before triton is first imported.
"""
