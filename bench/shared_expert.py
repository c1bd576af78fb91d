"""Qwen2-MoE's shared expert: non-expert tensors vs slab slots: ``python bench/shared_expert.py --help`` (multimoe_rt.benchmarks.shared_expert)."""
import sys

from multimoe_rt.benchmarks.shared_expert import main

if __name__ == "__main__":
    sys.exit(main())
