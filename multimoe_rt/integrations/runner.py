"""Running the HTTP server: ``multimoe-rt serve``'s main (the port bound first, then an engine from the
options, the app, uvicorn with slow-client limits and a graceful SIGTERM drain)."""

from __future__ import annotations

import errno
import json
import logging
import signal
import socket
import sys
import time
from pathlib import Path

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .server import EngineBackend, build_app

log = logging.getLogger(__name__)


class _H11WithHeaderTimeout(H11Protocol):
    """uvicorn's h11 protocol plus a header-read timeout, which uvicorn lacks: a connection must deliver a
    complete request line and headers within ``config.header_timeout`` seconds of opening, or of the first
    byte of its next request on a kept-alive connection; else it gets a 408 and is closed. (uvicorn's
    ``timeout_keep_alive`` only covers a connection idle between requests, and is cancelled by any byte, so a
    client sending headers a byte at a time would hold the connection forever.)"""

    _header_timer = None

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            self._disarm()
        elif self.conn.their_state is h11.IDLE:   # no complete request head yet
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._disarm()
        super().on_response_complete()

    def _arm(self) -> None:
        timeout = getattr(self.config, "header_timeout", None)
        if timeout:
            self._header_timer = self.loop.call_later(timeout, self._header_timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
                                 b"connection: close\r\ncontent-length: 36\r\n\r\n"
                                 b"request headers not received in time")
        self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn.Server that says where it listens once it accepts connections (port 0 picks a free one), and
    starts the app's drain clock when shutdown begins."""

    announce = None
    on_shutdown = None

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started and self.announce is not None:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.announce(host, port)

    async def shutdown(self, sockets=None):
        if self.on_shutdown is not None:
            self.on_shutdown()
        await super().shutdown(sockets)


class PortInUse(OSError):
    pass


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything slow is loaded; ``PortInUse`` if another process holds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} on {host} is already in use (another server?); stop it or pick another "
                            "--port") from None
        raise
    sock.set_inheritable(True)
    return sock


def serve(app, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0, log_level: str = "info",
          announce=None, *, sock: socket.socket | None = None, header_timeout: float | None = 10.0,
          keep_alive_timeout: float = 5.0, max_connections: int | None = 2048,
          max_header_bytes: int = 16 << 10) -> None:
    """Run ``app`` under uvicorn until SIGINT/SIGTERM; in-flight requests get ``drain_timeout`` seconds (the
    app's own clock ends open streams with an error event when it runs out; uvicorn waits a little longer so
    those last events reach the clients). ``sock``: an already bound socket (``bind``). Slow clients:
    ``header_timeout`` (request head), ``keep_alive_timeout`` (idle between requests), ``max_connections``
    (connections and requests at once; over it, 503), ``max_header_bytes`` (a larger head is a 400)."""
    grace = None if drain_timeout is None else drain_timeout + 5.0
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=grace, backlog=4096, timeout_keep_alive=keep_alive_timeout,
                            limit_concurrency=max_connections, h11_max_incomplete_event_size=max_header_bytes,
                            http=_H11WithHeaderTimeout)
    config.header_timeout = header_timeout
    server = _Server(config)
    mm = getattr(getattr(app, "state", None), "mm", None)
    if mm is not None:
        server.on_shutdown = mm.start_drain
    server.announce = announce or (lambda h, p: print(f"multimoe-rt serve: listening on http://{h}:{p}",
                                                      flush=True))
    # uvicorn re-raises the signal that stopped it once it has shut down; after a graceful drain that is a
    # clean exit, so the re-raised signal lands here and the process exits 0.
    received = []
    previous = {sig: signal.signal(sig, lambda s, f: received.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock] if sock is not None else None)
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
    """``multimoe-rt serve`` (options in ``server_args.py``)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "ray", False):
        from . import ray_serve

        return ray_serve.main(args)
    if not args.variant_dirs:
        print("multimoe-rt serve: give at least one checkpoint directory (the first is the base)", file=sys.stderr)
        return 2
    names = args.names.split(",") if args.names else None
    try:   # before loading anything: a port in use is a one-line answer, not a traceback after the load
        sock = bind(args.host, args.port)
    except OSError as e:
        print(f"multimoe-rt serve: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    engine = engine_from_args(args, names=names)
    backend = EngineBackend(engine, args.variant_dirs)
    print(f"multimoe-rt serve: {len(backend.names)} variants {backend.names}, context {backend.context}, "
          f"max batch {backend.max_seqs}, max queue {engine.max_queue}; loaded in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr, flush=True)
    app = build_app(backend, drain_timeout=args.drain_timeout, default_max_tokens=args.default_max_tokens,
                    stream_interval=args.stream_interval, body_timeout=args.body_timeout)
    serve(app, args.host, args.port, args.drain_timeout, log_level=args.log_level, sock=sock,
          header_timeout=args.header_timeout, keep_alive_timeout=args.keep_alive_timeout,
          max_connections=args.max_connections or None, max_header_bytes=args.max_header_bytes)
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
