"""Running the HTTP server: ``multimoe-rt serve``'s main (an engine from the options, the app, uvicorn with a
graceful SIGTERM drain)."""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import time
from pathlib import Path

import uvicorn

from .server import EngineBackend, build_app

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn.Server that says where it listens once it accepts connections (port 0 picks a free one)."""

    announce = None

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started and self.announce is not None:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.announce(host, port)


def serve(app, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0, log_level: str = "info",
          announce=None) -> None:
    """Run ``app`` under uvicorn until SIGINT/SIGTERM; in-flight requests get ``drain_timeout`` seconds."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=drain_timeout, backlog=4096, timeout_keep_alive=30)
    server = _Server(config)
    server.announce = announce or (lambda h, p: print(f"multimoe-rt serve: listening on http://{h}:{p}",
                                                      flush=True))
    # uvicorn re-raises the signal that stopped it once it has shut down; after a graceful drain that is a
    # clean exit, so the re-raised signal lands here and the process exits 0.
    received = []
    previous = {sig: signal.signal(sig, lambda s, f: received.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        log.info("stopped by signal %s after draining", received[0])


def engine_from_args(args, dirs=None, names=None):
    """An ``Engine`` from the ``multimoe-rt serve`` options."""
    import torch

    from ..engine import Engine
    from ..plan import parse_size

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    dirs = dirs or args.variant_dirs
    max_len = args.max_len
    if max_len is None:
        cfg = json.loads((Path(dirs[0]) / "config.json").read_text())
        max_len = min(int(cfg.get("max_position_embeddings") or 2048), 2048)
    return Engine.from_pretrained(dirs, names=names, plan=args.plan, share=args.share,
                                  budget=parse_size(args.budget) if args.budget else None,
                                  resident_sets=args.resident_sets, max_seqs=args.max_batch, max_len=max_len,
                                  device=args.device, dtype=dtype, max_step_tokens=args.max_step_tokens,
                                  max_queue=args.max_queue)


def main(args) -> int:
    """``multimoe-rt serve`` (options in ``serve_cli.py``)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "ray", False):
        from . import ray_serve

        return ray_serve.main(args)
    if not args.variant_dirs:
        print("multimoe-rt serve: give at least one checkpoint directory (the first is the base)", file=sys.stderr)
        return 2
    names = args.names.split(",") if args.names else None
    t0 = time.perf_counter()
    engine = engine_from_args(args, names=names)
    backend = EngineBackend(engine, args.variant_dirs)
    print(f"multimoe-rt serve: {len(backend.names)} variants {backend.names}, context {backend.context}, "
          f"max batch {backend.max_seqs}, max queue {engine.max_queue}; loaded in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr, flush=True)
    app = build_app(backend, drain_timeout=args.drain_timeout, default_max_tokens=args.default_max_tokens,
                    stream_interval=args.stream_interval)
    serve(app, args.host, args.port, args.drain_timeout, log_level=args.log_level)
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
