"""Migration v2 device states and the transition table (spec: DEVICE_FEATURE MIG_DEVICE_STATE).

The direct arcs are data; every other (from, to) pair is resolved to the shortest path that
has no saving state (PRE_COPY, STOP_COPY) in its interior, as the spec requires. The path
table is computed once at import, like libvfio-user's `lib/migration.c` table;
docs/protocol.md ("Migration") renders both.
"""

from __future__ import annotations

import enum
from collections import deque


class MigState(enum.IntEnum):
    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


S = MigState

#: the arcs a server must implement (P2P states are not used by vfio-user)
DIRECT_ARCS: frozenset[tuple[MigState, MigState]] = frozenset(
    {
        (S.RUNNING, S.STOP),
        (S.STOP, S.RUNNING),
        (S.STOP, S.STOP_COPY),
        (S.STOP_COPY, S.STOP),
        (S.STOP, S.RESUMING),
        (S.RESUMING, S.STOP),
        (S.RUNNING, S.PRE_COPY),
        (S.PRE_COPY, S.RUNNING),
        (S.PRE_COPY, S.STOP_COPY),
    }
)

#: forbidden outright by the spec ("STOP_COPY -> PRE_COPY is explicitly not allowed")
FORBIDDEN: frozenset[tuple[MigState, MigState]] = frozenset({(S.STOP_COPY, S.PRE_COPY)})

SAVING_STATES = frozenset({S.PRE_COPY, S.STOP_COPY})
#: states a client may ask for (ERROR is entered only on failure; P2P unused)
SETTABLE_STATES = frozenset({S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING, S.PRE_COPY})


def _shortest(src: MigState, dst: MigState, pre_copy: bool) -> tuple[MigState, ...] | None:
    arcs = [(a, b) for a, b in DIRECT_ARCS if pre_copy or S.PRE_COPY not in (a, b)]
    prev: dict[MigState, MigState] = {}
    queue = deque([src])
    seen = {src}
    while queue:
        cur = queue.popleft()
        if cur == dst:
            path = [cur]
            while path[-1] != src:
                path.append(prev[path[-1]])
            return tuple(reversed(path))[1:]
        if cur != src and cur in SAVING_STATES:
            continue  # saving states may only start or end a path
        for a, b in sorted(arcs):
            if a == cur and b not in seen:
                seen.add(b)
                prev[b] = cur
                queue.append(b)
    return None


def _table(pre_copy: bool) -> dict[tuple[MigState, MigState], tuple[MigState, ...]]:
    out = {}
    for a in SETTABLE_STATES:
        for b in SETTABLE_STATES:
            if a == b or (a, b) in FORBIDDEN:
                continue
            path = _shortest(a, b, pre_copy)
            if path is not None:
                out[(a, b)] = path
    return out


#: (from, to) -> the states to step through (the last one is `to`)
PATHS_WITH_PRE_COPY = _table(True)
PATHS_WITHOUT_PRE_COPY = _table(False)


def transition_path(
    src: MigState, dst: MigState, *, pre_copy: bool = True
) -> tuple[MigState, ...] | None:
    """Steps to get from src to dst, () if already there, None if not allowed."""
    if src == dst:
        return ()
    return (PATHS_WITH_PRE_COPY if pre_copy else PATHS_WITHOUT_PRE_COPY).get((src, dst))
