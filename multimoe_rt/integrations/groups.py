"""Variant groups for serving on several replicas, without Ray: which replica group holds which variant,
and the message protocol between the HTTP front and an engine replica.

A *group* is a list of checkpoint directories served by one engine (its slab and resident sets); the first
directory is the group's base. A group's id (``"base+ptb"``) is the Ray Serve multiplexed model id, so Ray
routes a request to a replica that already holds the group of its variant. ``ray_serve.py`` wires this to
Ray; everything here is plain Python and is tested without Ray.

Replica stream protocol (one request): first ``{"accepted": True, "replica", "group", "variants"}`` or
``{"error": {"kind", "message"}}``; then token ids (ints), or ``{"token", "logprob", "top"}`` when the request
asked for logprobs; then ``{"finish_reason": ...}`` or an error.

Where groups live (``GroupAffinity`` at the front, ``GroupGuard`` in each replica): a group with requests in
flight stays on its replica, and a group whose replica disappears (killed, being replaced) waits for it for a
grace period instead of evicting another replica's group. Without that, losing one replica of three made the
two survivors load the orphaned group in turn, each load evicting the other's group, for as long as the
replacement took to start.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from ..engine import QueueFull
from ..errors import EngineClosed, MultimoeError, RequestError


class VariantGroups:
    """``groups``: lists of directories (a directory may be in several groups). ``names``: optional
    {directory: name} (default: the directory's name). A variant is routed to the first group holding it."""

    def __init__(self, groups, names: dict | None = None):
        groups = [[str(d) for d in g] for g in groups]
        if not groups or any(not g for g in groups):
            raise ValueError("at least one non-empty variant group is needed")
        names = {str(k): v for k, v in (names or {}).items()}
        self.dirs: dict[str, str] = {}       # name -> directory
        self.groups: dict[str, list[str]] = {}      # group id -> directories
        self.group_names: dict[str, list[str]] = {}  # group id -> variant names
        self.holders: dict[str, list[str]] = {}      # variant name -> group ids
        for g in groups:
            gnames = [names.get(d, Path(d).name) for d in g]
            if len(set(gnames)) != len(gnames):
                raise ValueError(f"variant group {g} names a variant twice")
            for n, d in zip(gnames, g):
                if self.dirs.setdefault(n, d) != d:
                    raise ValueError(f"variant name {n!r} is used for two directories: {self.dirs[n]} and {d}")
            gid = "+".join(gnames)
            if gid in self.groups:
                raise ValueError(f"variant group {gid!r} given twice")
            self.groups[gid], self.group_names[gid] = g, gnames
            for n in gnames:
                self.holders.setdefault(n, []).append(gid)
        self.names = list(self.dirs)
        # the parent is the base of the group that serves the variant (none for that base itself)
        self.parents = {n: (None if self.group_names[g][0] == n else self.group_names[g][0])
                        for n, g in ((n, self.holders[n][0]) for n in self.names)}

    @classmethod
    def parse(cls, specs, names: dict | None = None) -> "VariantGroups":
        """From ``["dirA,dirB", "dirA,dirC"]`` (the ``--group`` options)."""
        return cls([[d.strip() for d in s.split(",") if d.strip()] for s in specs], names)

    def route(self, variant: str) -> str:
        """The group id (Ray multiplexed model id) that serves ``variant``."""
        try:
            return self.holders[variant][0]
        except KeyError:
            raise RequestError(f"unknown variant {variant!r}; known: {self.names}") from None

    def to_dict(self) -> dict:
        return {"groups": list(self.groups.values()), "names": {d: n for n, d in self.dirs.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "VariantGroups":
        return cls(d["groups"], d.get("names"))


# -- where groups live ---------------------------------------------------------------------------------
class Misrouted(MultimoeError, RuntimeError):
    """A replica declined a group it does not hold: its own group has requests in flight, or the front has
    not allowed the group to move yet. The front retries."""


class GroupAffinity:
    """The front's memory of which replica holds each group. ``placed`` when a replica serves it, ``lost`` when
    its replica failed or declined it. ``may_move(group)``: may a replica holding another (idle) group take
    it? Yes for a group never placed; for a placed one only after its replica has been missing for
    ``grace_s`` (a replacement replica usually starts within that)."""

    def __init__(self, grace_s: float = 30.0, clock=time.monotonic):
        self.grace_s, self.clock = grace_s, clock
        self.home: dict[str, str] = {}
        self.missing_since: dict[str, float] = {}

    def placed(self, group: str, replica: str) -> None:
        self.home[group] = replica
        self.missing_since.pop(group, None)

    def lost(self, group: str) -> None:
        self.missing_since.setdefault(group, self.clock())

    def may_move(self, group: str) -> bool:
        if group not in self.home:
            return True
        since = self.missing_since.get(group)
        return since is not None and self.clock() - since >= self.grace_s


class GroupGuard:
    """A replica's rule for taking a group (one group per replica): ``check(group, may_move)`` is None when
    it may serve ``group`` now, else the reason it declines. The group it holds stays while any request for it
    is in flight; an idle group is replaced only when the front allows the move. ``enter``/``leave`` bracket
    each request; ``switches`` counts group changes (each one an engine reload)."""

    def __init__(self):
        self.current: str | None = None
        self.in_flight = 0
        self.switches = 0

    def check(self, group: str, may_move: bool) -> str | None:
        if self.current is None or self.current == group:
            return None
        if self.in_flight:
            return f"this replica serves group {self.current!r} ({self.in_flight} requests in flight)"
        if not may_move:
            return f"this replica holds group {self.current!r}; {group!r} waits for its own replica"
        return None

    def enter(self, group: str) -> None:
        if self.current != group:
            self.switches += self.current is not None
            self.current = group
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1


async def start_with_affinity(start, group: str, affinity: GroupAffinity, *, lost_errors=(), retry_s: float = 0.2,
                              give_up_s: float | None = None, sleep=asyncio.sleep):
    """Submit through ``start(may_move) -> started RemoteJob`` until a replica accepts: a declined group
    (``Misrouted``) or a failed replica (``lost_errors``) marks the group lost and retries after ``retry_s``;
    after ``give_up_s`` (default: the grace period plus 30 s) the last error is raised."""
    give_up_s = affinity.grace_s + 30.0 if give_up_s is None else give_up_s
    t0 = affinity.clock()
    while True:
        try:
            job = await start(affinity.may_move(group))
        except (Misrouted, *lost_errors) as e:
            affinity.lost(group)
            if affinity.clock() - t0 >= give_up_s:
                raise EngineClosed(f"no replica could take variant group {group!r}: {e}") from e
            await sleep(retry_s)
            continue
        affinity.placed(group, str(job.info.get("replica")))
        return job


# -- errors across the process boundary -----------------------------------------------------------------
_KINDS = {"queue_full": QueueFull, "closed": EngineClosed, "misrouted": Misrouted, "request": RequestError}


def encode_error(e: BaseException) -> dict:
    kind = next((k for k, cls in _KINDS.items() if isinstance(e, cls)), "internal")
    return {"error": {"kind": kind, "message": str(e)}}


def decode_error(d: dict) -> BaseException:
    err = d.get("error") or {}
    return _KINDS.get(err.get("kind"), RuntimeError)(err.get("message", "replica error"))


class RemoteJob:
    """The front's view of one request running on a replica: ``await start()`` (raises the submission
    error), then ``async for token in job``, ``cancel()``, ``finish_reason``, ``headers`` (which replica)."""

    def __init__(self, stream, cancel=None):
        self._stream, self._cancel = stream, cancel
        self._it = stream.__aiter__()
        self.tokens: list[int] = []
        self.logprobs: list = []
        self.finish_reason: str | None = None
        self.headers: dict = {}
        self.info: dict = {}
        self.done = False

    async def start(self) -> "RemoteJob":
        first = await self._it.__anext__()
        if "error" in first:
            self.done = True
            raise decode_error(first)
        self.info = first
        self.headers = {"x-multimoe-replica": str(first.get("replica")), "x-multimoe-group": str(first.get("group"))}
        return self

    async def __aiter__(self):
        async for item in self._it:
            if isinstance(item, int):
                self.tokens.append(item)
                yield item
            elif "token" in item:
                self.logprobs.append((item["logprob"], [tuple(x) for x in item["top"]]))
                self.tokens.append(item["token"])
                yield item["token"]
            elif "error" in item:
                self.done, self.finish_reason = True, "error"
                raise decode_error(item)
            else:
                self.finish_reason = item.get("finish_reason")
        self.done = True

    def cancel(self) -> None:
        if not self.done and self._cancel is not None:
            self.done = True
            self._cancel()


async def replica_stream(engine, variant: str, prompt, kwargs: dict, info: dict):
    """The replica side of the protocol over an ``Engine``: what ``RemoteJob`` reads."""
    try:
        h = engine.submit(variant, prompt, **kwargs)
    except Exception as e:  # noqa: BLE001 - sent to the front, which answers with the right status
        yield encode_error(e)
        return
    yield {"accepted": True, **info}
    with_lp = kwargs.get("logprobs") is not None
    try:
        k = 0
        async for tok in h:
            if with_lp:
                lps = getattr(h, "logprobs", None) or []
                lp, top = lps[k] if k < len(lps) else (float("nan"), [])
                yield {"token": tok, "logprob": lp, "top": [list(x) for x in top]}
            else:
                yield tok
            k += 1
        yield {"finish_reason": h.finish_reason}
    except Exception as e:  # noqa: BLE001
        yield encode_error(e)
    finally:   # also when the front cancels the stream (client gone): free the sequence
        if not h.done:
            h.cancel()
