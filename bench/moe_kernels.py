"""MoE kernels vs transformers' experts implementations, and the delta codecs vs the dense slab:
``python bench/moe_kernels.py [--quick] [--only layers|codecs] [--out PATH]`` (multimoe_rt.benchmarks.kernels)."""
import sys

from multimoe_rt.benchmarks.kernels import main

if __name__ == "__main__":
    sys.exit(main())
