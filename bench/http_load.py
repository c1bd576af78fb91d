"""Load on the OpenAI-style HTTP server: ``python bench/http_load.py --help`` (multimoe_rt.benchmarks.http_load)."""
import sys

from multimoe_rt.benchmarks.http_load import main

if __name__ == "__main__":
    sys.exit(main())
