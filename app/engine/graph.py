"""A definition's steps as a graph: what each step needs, what it unblocks, which steps start a run.

``needs`` absent means the step before it (the first step needs nothing), so a definition written
before ``needs`` existed is a chain, and a chain keeps the engine's linear hot path (one statement
records a step and claims the next). Any other shape is a DAG: each step finishing settles the run
under its lock (``execution.settle``): steps whose needs are all met are queued, steps behind a
failure are skipped, and the run ends when nothing is left to run.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from app.engine.states import STEP_FINISHED, reusable
from models.states import StepStatus

_cache: dict[int, tuple[dict[str, Any], Graph]] = {}
_cache_lock = threading.Lock()
_MAX_CACHED = 10_000


@dataclass(frozen=True)
class Graph:
    """Positions are the steps' places in the definition (``stepResults`` keep that order)."""

    ids: tuple[str, ...]
    needs: tuple[tuple[int, ...], ...]
    children: tuple[tuple[int, ...], ...]
    ancestors: tuple[frozenset[int], ...]
    order: tuple[int, ...]  # a topological order, stable (definition order among equals)
    linear: bool

    @property
    def roots(self) -> tuple[int, ...]:
        """The steps a new run starts with (they need nothing)."""
        return tuple(i for i, needs in enumerate(self.needs) if not needs)

    def descendants(self, positions: set[int] | frozenset[int]) -> set[int]:
        """``positions`` and every step that needs one of them, directly or not."""
        found, todo = set(positions), list(positions)
        while todo:
            for child in self.children[todo.pop()]:
                if child not in found:
                    found.add(child)
                    todo.append(child)
        return found

    def needed_ids(self, position: int) -> frozenset[str]:
        """The ids of the steps ``position`` needs, directly or not (what its templates see)."""
        return frozenset(self.ids[i] for i in self.ancestors[position])

    def progress(self, rows: Iterable[Any]) -> Progress:
        """Where a run stands, from its step rows (``position``, ``status``, ``duration_ms``):
        which pending steps can start, which never will (a step they need failed, or was skipped
        by the run's end), and whether anything is left to run."""
        by_position = {row.position: row for row in rows}
        met: dict[int, bool | None] = {}  # done (True), blocked (False), not yet (None)
        found = Progress([], [], unfinished=False)
        for position in self.order:
            row = by_position[position]
            if row.status == StepStatus.PENDING:
                needs = [met[p] for p in self.needs[position]]
                if False in needs:
                    found.blocked.append(position)
                    met[position] = False
                    continue
                if all(needs):
                    found.ready.append(position)
                met[position] = None
            elif row.status in STEP_FINISHED:
                met[position] = reusable(row.status, row.duration_ms)
            else:
                met[position] = None  # queued, running, waiting: still going
        found.unfinished = any(status is None for status in met.values())
        return found


@dataclass
class Progress:
    """``Graph.progress``: positions, in topological order."""

    ready: list[int]
    blocked: list[int]
    unfinished: bool


def declared_needs(steps: list[dict[str, Any]]) -> list[list[str]]:
    """Each step's needs as ids: ``needs`` when given, else the step before it."""
    return [
        list(step["needs"]) if step.get("needs") is not None else ([steps[i - 1]["id"]] if i else [])
        for i, step in enumerate(steps)
    ]


def find_cycle(steps: list[dict[str, Any]]) -> list[str] | None:
    """A cycle among the steps' needs, as ids from a step back to itself; None when acyclic.
    Unknown ids are ignored here (validation names them apart)."""
    ids = [step["id"] for step in steps]
    index = {step_id: i for i, step_id in enumerate(ids)}
    needs = [[index[n] for n in declared if n in index] for declared in declared_needs(steps)]
    state = [0] * len(ids)  # 0 new, 1 on the path, 2 done
    for start in range(len(ids)):
        if state[start]:
            continue
        path: list[int] = []
        stack: list[tuple[int, int]] = [(start, 0)]
        while stack:
            node, next_edge = stack.pop()
            if next_edge == 0:
                state[node] = 1
                path.append(node)
            if next_edge < len(needs[node]):
                stack.append((node, next_edge + 1))
                child = needs[node][next_edge]
                if state[child] == 1:  # back on the path: the cycle runs from child to node
                    cycle = path[path.index(child) :]
                    # Written in the direction work flows: each step needs the one before it.
                    return [ids[i] for i in reversed(cycle)] + [ids[cycle[-1]]]
                if state[child] == 0:
                    stack.append((child, 0))
            else:
                state[node] = 2
                path.pop()
    return None


def graph(definition: dict[str, Any]) -> Graph:
    """The definition's graph (cached per definition object: versions are immutable)."""
    key = id(definition)
    cached = _cache.get(key)
    if cached is not None and cached[0] is definition:
        return cached[1]
    built = _build(definition["steps"])
    with _cache_lock:
        if len(_cache) >= _MAX_CACHED:
            _cache.clear()
        _cache[key] = (definition, built)
    return built


def _build(steps: list[dict[str, Any]]) -> Graph:
    ids = tuple(step["id"] for step in steps)
    index = {step_id: i for i, step_id in enumerate(ids)}
    needs = tuple(tuple(index[n] for n in declared) for declared in declared_needs(steps))
    children: list[list[int]] = [[] for _ in ids]
    for child, parents in enumerate(needs):
        for parent in parents:
            children[parent].append(child)
    order = _topological(needs)
    ancestors: list[frozenset[int]] = [frozenset()] * len(ids)
    for node in order:
        found: set[int] = set()
        for parent in needs[node]:
            found.add(parent)
            found |= ancestors[parent]
        ancestors[node] = frozenset(found)
    linear = all(parents == ((i - 1,) if i else ()) for i, parents in enumerate(needs))
    return Graph(ids, needs, tuple(tuple(c) for c in children), tuple(ancestors), order, linear)


def _topological(needs: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    """Kahn's order, taking the lowest position first among the ready ones."""
    waiting = [len(parents) for parents in needs]
    children: list[list[int]] = [[] for _ in needs]
    for child, parents in enumerate(needs):
        for parent in parents:
            children[parent].append(child)
    ready = sorted(i for i, n in enumerate(waiting) if n == 0)
    order: list[int] = []
    while ready:
        node = ready.pop(0)
        order.append(node)
        for child in children[node]:
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
                ready.sort()
    if len(order) != len(needs):
        raise ValueError("the steps' needs form a cycle")  # validation refuses these definitions
    return tuple(order)
