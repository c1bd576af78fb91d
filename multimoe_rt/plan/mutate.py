"""Hand edits gone wrong, generated: mutations of a plan's JSON for fuzzing, and the check a mutant that loads must
pass. One mutator for the plan test and the reliability bench (``hypothesis`` is a test dependency: imported
on use).

A mutant is the plan's text with one of: a value anywhere in the document set to junk of another type or range
(``set``), a key or list item removed (``delete``), two values swapped (``swap``: plausible-looking edits, such
as two slots exchanged), or the text cut short (``truncate``). Loading one must end in ``PlanError`` or in a
slab that serves every entry what the plan says: its own tensors, or the anchor's where it says shared.
"""

from __future__ import annotations

import json

import torch

KINDS = ("set", "delete", "swap", "truncate")


def json_paths(node, prefix: tuple = ()):
    """Every key/index path below ``node`` (the root itself excluded)."""
    if prefix:
        yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from json_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from json_paths(v, prefix + (i,))


def _at(doc, path: tuple):
    """The container holding ``path``'s last key."""
    for k in path[:-1]:
        doc = doc[k]
    return doc


def mutants(text: str):
    """A hypothesis strategy of ``(kind, mutated text)`` from a plan's JSON ``text``."""
    from hypothesis import strategies as st

    paths = list(json_paths(json.loads(text)))
    junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.just(2**70), st.floats(allow_nan=False),
                     st.text(max_size=4), st.just([]), st.just({}), st.lists(st.integers(-1, 5), max_size=3))

    @st.composite
    def mutant(draw):
        kind = draw(st.sampled_from(KINDS))
        if kind == "truncate":
            return kind, text[:draw(st.integers(0, len(text) - 1))]
        doc = json.loads(text)
        path = draw(st.sampled_from(paths))
        parent = _at(doc, path)
        if kind == "set":
            parent[path[-1]] = draw(junk)
        elif kind == "delete":
            parent.pop(path[-1])
        else:
            other = draw(st.sampled_from(paths))
            q = _at(doc, other)
            # Both containers are looked up before either value moves, so a path inside the other swaps a
            # subtree for one of its own parts; the part that would hold a cycle is no longer reachable.
            parent[path[-1]], q[other[-1]] = q[other[-1]], parent[path[-1]]
        return kind, json.dumps(doc)

    return mutant()


def wrong_entries(plan, variant_set, slab, table) -> list[tuple]:
    """``(variant, layer, expert, status)`` of every entry that ``slab`` and ``table``, loaded from ``plan``, do not
    serve its checkpoint's tensors (the anchor's for a shared entry). Offloaded slots and mean representatives
    are skipped: their bytes are not a checkpoint's."""
    wrong = []
    for v in range(len(variant_set)):
        for layer in range(variant_set.num_layers):
            for e in range(variant_set.num_experts):
                s = plan.slots[v][layer][e]
                if plan.slot_location[s] == "host" or plan.slot_sources[s]["kind"] == "mean":
                    continue
                status = plan.status[v][layer][e]
                w1, w2 = variant_set[plan.anchor if status == "shared" else v].expert(layer, e)
                slot = int(table.slots[v, layer, e])
                if not (torch.equal(slab.w1[slot], w1) and torch.equal(slab.w2[slot], w2)):
                    wrong.append((v, layer, e, status))
    return wrong
