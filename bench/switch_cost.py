"""What a variant switch costs, and what a prefetch hides: ``python bench/switch_cost.py --help`` (multimoe_rt.benchmarks.switch_cost)."""
import sys

from multimoe_rt.benchmarks.switch_cost import main

if __name__ == "__main__":
    sys.exit(main())
