"""Ray Serve deployment: engine replicas hold variant groups; one OpenAI front routes each request to a
replica that holds its variant.

    multimoe-rt serve --ray --group zoo/base,zoo/ptb --group zoo/base,zoo/pycode --port 8000
    serve run multimoe_rt.integrations.ray_serve:app_builder groups="zoo/base,zoo/ptb;zoo/base,zoo/pycode"

* ``EngineReplica`` (``num_replicas`` copies): ``@serve.multiplexed`` loads one ``Engine`` per *variant group*
  (its slab and resident sets); the multiplexed model id is the group id (``"base+ptb"``). Ray routes a request
  carrying that id to a replica that already holds the group (``serve.get_multiplexed_model_id()`` inside).
* ``OpenAIFront`` (the ingress): the same FastAPI app as the single-process server (``server.build_app``) over a
  ``RayBackend`` that maps ``model`` -> group (``groups.VariantGroups``) and streams tokens back from the replica
  with ``handle.options(stream=True, multiplexed_model_id=group)``. A client that disconnects cancels the
  replica-side stream, which cancels the engine request.
* At start, the front loads the groups one after another, so each lands on a replica without one (Ray prefers
  the replica with the fewest loaded models); responses name the replica and group in ``x-multimoe-replica`` /
  ``x-multimoe-group`` headers.

Needs the ``ray`` extra (``pip install 'multimoe_rt[ray]'``); the routing logic lives in ``groups.py``.
"""

from __future__ import annotations

try:
    import ray
    from ray import serve
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"multimoe_rt.integrations.ray_serve needs Ray Serve ({e.name} is missing): "
                      "pip install 'multimoe_rt[ray]'") from e

import asyncio
import logging
import os
import signal
import sys
import time

from . import openai_api as oa
from .groups import GroupAffinity, GroupGuard, Misrouted, RemoteJob, VariantGroups, encode_error, replica_stream, \
    start_with_affinity

log = logging.getLogger(__name__)


class _GroupEngine:
    """One group's engine; Ray's multiplexer calls ``__del__`` when it unloads the group (LRU)."""

    def __init__(self, engine):
        self.engine = engine

    def __del__(self):
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown(drain=True, timeout=30)


def _replica_id() -> str:
    try:
        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        return str(getattr(rid, "unique_id", None) or rid or ctx.replica_tag)
    except Exception:  # noqa: BLE001
        return f"pid{os.getpid()}"


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000)
class EngineReplica:
    """Holds the engine of one variant group at a time (``max_groups`` with more device memory)."""

    def __init__(self, groups: dict, engine_kwargs: dict, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.groups = VariantGroups.from_dict(groups)
        self.engine_kwargs = dict(engine_kwargs)
        self.replica = _replica_id()
        self.guard = GroupGuard()   # the group in flight stays; another replaces it only when the front allows

    @serve.multiplexed(max_num_models_per_replica=1)
    async def engine_for(self, group: str) -> _GroupEngine:
        from ..engine import Engine

        if group not in self.groups.groups:
            raise ValueError(f"unknown variant group {group!r}; known: {list(self.groups.groups)}")
        dirs, names = self.groups.groups[group], self.groups.group_names[group]
        log.info("replica %s loads variant group %s", self.replica, group)
        engine = await asyncio.to_thread(Engine.from_pretrained, dirs, names=names, **self.engine_kwargs)
        return _GroupEngine(engine)

    async def load(self, may_move: bool = True) -> dict:
        """Load the group of this request's multiplexed model id; which replica holds it (or an error)."""
        group = serve.get_multiplexed_model_id()
        reason = self.guard.check(group, may_move)
        if reason is not None:
            return encode_error(Misrouted(reason))
        self.guard.enter(group)
        try:
            g = await self.engine_for(group)
        finally:
            self.guard.leave()
        return {"replica": self.replica, "group": group, "variants": list(g.engine.names)}

    async def generate(self, variant: str, prompt: list, kwargs: dict, may_move: bool = True):
        group = serve.get_multiplexed_model_id()
        reason = self.guard.check(group, may_move)
        if reason is not None:   # checked before engine_for: Ray's multiplexer would evict the held group
            yield encode_error(Misrouted(reason))
            return
        self.guard.enter(group)
        try:
            g = await self.engine_for(group)
            info = {"replica": self.replica, "group": group, "variants": list(g.engine.names)}
            async for item in replica_stream(g.engine, variant, prompt, kwargs, info):
                yield item
        finally:
            self.guard.leave()


class RayBackend:
    """``server.build_app``'s backend over Ray: ``model`` -> variant group -> a replica holding it."""

    def __init__(self, handle, groups: VariantGroups, context: int, grace_s: float = 30.0):
        self.handle, self.groups, self.context = handle, groups, context
        self.names, self.parents = groups.names, groups.parents
        self.affinity = GroupAffinity(grace_s)
        self.lost_errors = tuple(c for c in (getattr(ray.exceptions, n, None) for n in
                                             ("RayActorError", "ActorUnavailableError")) if isinstance(c, type))
        self.codecs = {}
        for gid, gnames in groups.group_names.items():
            self.codecs.update({n: c for n, c in oa.load_codecs(groups.groups[gid], gnames).items()
                                if n not in self.codecs})

    async def submit(self, variant: str, prompt: list, **kw):
        group = self.groups.route(variant)

        async def start(may_move: bool):
            gen = self.handle.options(stream=True, multiplexed_model_id=group) \
                .generate.remote(variant, list(prompt), kw, may_move)
            return await RemoteJob(gen, cancel=gen.cancel).start()

        return await start_with_affinity(start, group, self.affinity, lost_errors=self.lost_errors)

    async def warmup(self) -> list[dict]:
        """Load every group, one after another (each goes to a replica that holds none yet, while one is free)."""
        out = []
        for gid in self.groups.groups:
            info = await self.handle.options(multiplexed_model_id=gid).load.remote()
            if "error" not in info:
                self.affinity.placed(gid, str(info["replica"]))
            out.append(info)
        return out


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000)
@serve.ingress()
class OpenAIFront:
    async def __init__(self, replica, groups: dict, context: int, app_kwargs: dict | None = None,
                       warmup: bool = True):
        self.backend = RayBackend(replica, VariantGroups.from_dict(groups), context)
        self.app_kwargs = dict(app_kwargs or {})
        self.placement = await self.backend.warmup() if warmup else []

    def __serve_build_asgi_app__(self):
        from .server import build_app

        app = build_app(self.backend, close_backend=False, **self.app_kwargs)

        @app.get("/v1/placement")
        async def placement():   # which replica loaded which group at start
            return {"placement": self.placement}

        return app


def resolve_max_len(dirs, max_len: int | None) -> int:
    import json
    from pathlib import Path

    if max_len is not None:
        return int(max_len)
    cfg = json.loads((Path(dirs[0]) / "config.json").read_text())
    return min(int(cfg.get("max_position_embeddings") or 2048), 2048)


def build(groups: VariantGroups, engine_kwargs: dict | None = None, replicas: int | None = None,
          app_kwargs: dict | None = None, threads: int | None = None, warmup: bool = True):
    """The Ray Serve application (``serve.run(build(...), route_prefix="/")``). ``engine_kwargs`` go to
    ``Engine.from_pretrained`` (max_seqs, max_len, share, budget, device, dtype, ...)."""
    engine_kwargs = dict(engine_kwargs or {})
    first = next(iter(groups.groups.values()))
    engine_kwargs["max_len"] = resolve_max_len(first, engine_kwargs.get("max_len"))
    replica = EngineReplica.options(num_replicas=replicas or len(groups.groups)).bind(
        groups.to_dict(), engine_kwargs, threads)
    return OpenAIFront.bind(replica, groups.to_dict(), engine_kwargs["max_len"], app_kwargs, warmup)


def app_builder(args: dict):
    """For ``serve run multimoe_rt.integrations.ray_serve:app_builder groups="a,b;a,c" [replicas=2]
    [max_batch=64] [max_queue=4096] [max_len=N] [share=S] [device=cpu] [threads=1]``."""
    groups = VariantGroups.parse(str(args["groups"]).split(";"))
    kw = {"max_seqs": int(args.get("max_batch", 64)), "max_queue": int(args.get("max_queue", 4096)),
          "device": args.get("device", "cpu")}
    if args.get("max_len"):
        kw["max_len"] = int(args["max_len"])
    if args.get("share") is not None:
        kw["share"] = float(args["share"])
    return build(groups, kw, replicas=int(args["replicas"]) if args.get("replicas") else None,
                 threads=int(args["threads"]) if args.get("threads") else None)


def main(args) -> int:
    """``multimoe-rt serve --ray``: a local Ray instance (or ``RAY_ADDRESS``), the app on ``--host:--port``,
    until SIGINT/SIGTERM."""
    import torch

    from ..plan import parse_size

    specs = args.group or [",".join(args.variant_dirs)]
    groups = VariantGroups.parse(specs)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    kw = dict(max_seqs=args.max_batch, max_queue=args.max_queue, max_len=args.max_len, device=args.device,
              dtype=dtype, max_step_tokens=args.max_step_tokens, resident_sets=args.resident_sets)
    if args.share is not None:
        kw["share"] = args.share
    if args.budget:
        kw["budget"] = parse_size(args.budget)
    if args.plan:
        print("multimoe-rt serve --ray: --plan is per group; use --share or --budget", file=sys.stderr)
        return 2
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build(groups, kw, replicas=args.replicas,
                    app_kwargs={"default_max_tokens": args.default_max_tokens,
                                "stream_interval": args.stream_interval}),
              name="multimoe", route_prefix="/")
    print(f"multimoe-rt serve: listening on http://{args.host}:{args.port} (Ray Serve; groups "
          f"{list(groups.groups)})", flush=True)
    stop = []   # a handler must not take a lock the main thread may hold (Event.set inside Event.wait deadlocks)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stop.append(s))
    while not stop:
        time.sleep(0.2)
    print("multimoe-rt serve: stopping Ray Serve", file=sys.stderr, flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0
