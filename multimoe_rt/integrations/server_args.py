"""Options of ``multimoe-rt serve`` (also ``python -m multimoe_rt.integrations.server_args``).

Only argparse here, so that building the ``multimoe-rt`` parser stays fast; ``runner.main`` does the work.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(sv: argparse.ArgumentParser) -> None:
    sv.add_argument("variant_dirs", nargs="*", help="checkpoint directories; the first is the base")
    sv.add_argument("--names", default=None, help="comma-separated model names (default: directory names)")
    how = sv.add_mutually_exclusive_group()
    how.add_argument("--plan", default=None, help="plan JSON from `multimoe-rt plan`")
    how.add_argument("--share", type=float, default=None, help="fraction of fine-tuned experts shared with the base")
    how.add_argument("--budget", default=None, help="device bytes for experts, e.g. 30MiB")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed when listening)")
    sv.add_argument("--max-batch", type=int, default=64, help="sequences running at once (KV-cache rows)")
    sv.add_argument("--max-queue", type=int, default=4096, help="waiting requests before 429")
    sv.add_argument("--max-len", type=int, default=None, help="context per sequence (default: the model's, <= 2048)")
    sv.add_argument("--max-step-tokens", type=int, default=256, help="token budget of one batched step")
    sv.add_argument("--resident-sets", type=int, default=None, help="non-expert sets on the device (default: all)")
    sv.add_argument("--default-max-tokens", type=int, default=16, help="a completion's max_tokens when not given")
    sv.add_argument("--stream-interval", type=int, default=1,
                    help="tokens per streamed chunk (the first token is sent at once)")
    sv.add_argument("--drain-timeout", type=float, default=30.0,
                    help="seconds SIGTERM lets in-flight requests run; then open streams end with an error event "
                    "and [DONE], unfinished non-streamed requests get 503")
    sv.add_argument("--header-timeout", type=float, default=10.0,
                    help="seconds a connection has to send a complete request line and headers (408 and closed "
                    "after); 0 turns it off")
    sv.add_argument("--keep-alive-timeout", type=float, default=5.0,
                    help="seconds an idle kept-alive connection stays open between requests")
    sv.add_argument("--body-timeout", type=float, default=60.0,
                    help="seconds a client has to send its whole request body (408 after)")
    sv.add_argument("--max-connections", type=int, default=2048,
                    help="open connections (and requests in progress) at once; over it a request gets 503; "
                    "0: no limit")
    sv.add_argument("--max-header-bytes", type=int, default=16384,
                    help="largest request line plus headers (a larger head is a 400)")
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    sv.add_argument("--log-level", default="info")
    sv.add_argument("--ray", action="store_true", help="Ray Serve: replicas hold variant groups (ray extra)")
    sv.add_argument("--group", action="append", default=None,
                    help="with --ray: a comma-separated variant group (directories); repeat per group")
    sv.add_argument("--replicas", type=int, default=None, help="with --ray: engine replicas (default: one per group)")


def run(args) -> int:
    from . import runner

    return runner.main(args)


def main(argv=None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    p = argparse.ArgumentParser(prog="multimoe-rt serve", description="OpenAI-compatible HTTP server over the "
                                "batching engine: one model per fine-tuned variant")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
