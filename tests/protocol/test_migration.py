"""protocol/_migration.py: the migration v2 device-state table against the spec's rules.

Spec (DEVICE_FEATURE, MIG_DEVICE_STATE): the direct arcs are listed; every other transition
is "the shortest path" that has no saving-group state (PRE_COPY, STOP_COPY) in its interior;
STOP_COPY -> PRE_COPY is not allowed; without PRE_COPY support arcs touching it are removed.
The reference answer is a brute-force search written here, and linux's
vfio_mig_get_next_state table for the same states.
"""

from __future__ import annotations

import itertools

import pytest

from protocol import DIRECT_ARCS, MigState, transition_path

S = MigState
SETTABLE = [S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING, S.PRE_COPY]
SAVING = {S.PRE_COPY, S.STOP_COPY}

SPEC_ARCS = {
    (S.RUNNING, S.STOP), (S.STOP_COPY, S.STOP), (S.RESUMING, S.STOP), (S.PRE_COPY, S.RUNNING),
    (S.STOP, S.RUNNING), (S.RUNNING, S.PRE_COPY), (S.STOP, S.STOP_COPY),
    (S.PRE_COPY, S.STOP_COPY), (S.STOP, S.RESUMING),
}


def arcs(pre_copy: bool) -> set[tuple[MigState, MigState]]:
    return {a for a in SPEC_ARCS if pre_copy or S.PRE_COPY not in a}


def valid(path: tuple[MigState, ...], src: MigState, pre_copy: bool) -> bool:
    steps = [src, *path]
    return all(s in arcs(pre_copy) for s in itertools.pairwise(steps)) and not any(
        s in SAVING for s in steps[1:-1]
    )


def brute_shortest(src: MigState, dst: MigState, pre_copy: bool) -> int | None:
    """Length of the shortest valid path, trying every sequence of states up to length 5."""
    if (src, dst) == (S.STOP_COPY, S.PRE_COPY):
        return None  # "explicitly not allowed", though STOP, RUNNING, PRE_COPY would be valid
    for n in range(1, 6):
        for mid in itertools.product(SETTABLE, repeat=n - 1):
            if valid((*mid, dst), src, pre_copy):
                return n
    return None


def test_direct_arcs_are_the_spec_list() -> None:
    assert set(DIRECT_ARCS) == SPEC_ARCS


@pytest.mark.parametrize(("src", "dst"), sorted(SPEC_ARCS))
def test_every_direct_arc_is_one_step(src: MigState, dst: MigState) -> None:
    assert transition_path(src, dst) == (dst,)
    if S.PRE_COPY not in (src, dst):
        assert transition_path(src, dst, pre_copy=False) == (dst,)


def test_stop_copy_to_pre_copy_rejected() -> None:
    assert transition_path(S.STOP_COPY, S.PRE_COPY) is None
    assert transition_path(S.STOP_COPY, S.PRE_COPY, pre_copy=False) is None


def test_same_state_is_empty_path() -> None:
    for s in SETTABLE:
        assert transition_path(s, s) == ()


def test_error_and_p2p_are_not_reachable_or_leavable() -> None:
    for s in SETTABLE:
        assert transition_path(S.ERROR, s) is None  # only DEVICE_RESET leaves ERROR
        assert transition_path(s, S.ERROR) is None  # ERROR cannot be requested
        assert transition_path(s, S.RUNNING_P2P) is None
        assert transition_path(s, S.PRE_COPY_P2P) is None


PAIRS = [(a, b) for a in SETTABLE for b in SETTABLE if a != b]


@pytest.mark.parametrize("pre_copy", [True, False])
@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_paths_valid_and_shortest(src: MigState, dst: MigState, pre_copy: bool) -> None:
    path = transition_path(src, dst, pre_copy=pre_copy)
    best = brute_shortest(src, dst, pre_copy)
    if best is None:
        assert path is None
        return
    assert path is not None, (src, dst)
    assert path[-1] == dst
    assert valid(path, src, pre_copy), path  # only direct arcs, no saving state inside
    assert not any(s in SAVING for s in path[:-1])
    assert len(path) == best


@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_without_pre_copy_no_path_touches_it(src: MigState, dst: MigState) -> None:
    path = transition_path(src, dst, pre_copy=False)
    if S.PRE_COPY in (src, dst):
        assert path is None
    else:
        assert path is not None and S.PRE_COPY not in path


# linux drivers/vfio/vfio_main.c vfio_mig_get_next_state, expanded to whole paths
LINUX = {
    (S.RUNNING, S.STOP_COPY): (S.STOP, S.STOP_COPY),  # not via PRE_COPY: saving interior
    (S.RUNNING, S.RESUMING): (S.STOP, S.RESUMING),
    (S.STOP, S.PRE_COPY): (S.RUNNING, S.PRE_COPY),
    (S.STOP_COPY, S.RUNNING): (S.STOP, S.RUNNING),
    (S.STOP_COPY, S.RESUMING): (S.STOP, S.RESUMING),
    (S.RESUMING, S.RUNNING): (S.STOP, S.RUNNING),
    (S.RESUMING, S.STOP_COPY): (S.STOP, S.STOP_COPY),
    (S.RESUMING, S.PRE_COPY): (S.STOP, S.RUNNING, S.PRE_COPY),
    (S.PRE_COPY, S.STOP): (S.RUNNING, S.STOP),  # not via STOP_COPY
    (S.PRE_COPY, S.RESUMING): (S.RUNNING, S.STOP, S.RESUMING),
}


@pytest.mark.parametrize(("pair", "expected"), sorted(LINUX.items()))
def test_compound_paths_match_linux(pair: tuple[MigState, MigState],
                                    expected: tuple[MigState, ...]) -> None:
    assert transition_path(*pair) == expected
