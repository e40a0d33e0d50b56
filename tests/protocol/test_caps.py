"""protocol/_caps.py: the VERSION capabilities object, its defaults, checks and negotiation."""

from __future__ import annotations

import errno
from dataclasses import replace
from typing import Any

import pytest

from protocol import Capabilities, MigrationCaps, RemoteProtocolError, TwinSocket, negotiate


def test_missing_keys_take_spec_defaults() -> None:
    caps = Capabilities.from_json({})
    assert caps.max_msg_fds == 1  # "the receiver must assume a value of 1"
    assert caps.max_data_xfer_size == 1048576
    assert caps.max_dma_maps == 65535
    assert caps.pgsizes == 4096
    assert caps.write_multiple is False
    assert caps.twin_socket is None
    assert caps.migration is None
    assert caps == Capabilities()


def test_every_key_parsed() -> None:
    obj = {
        "max_msg_fds": 8,
        "max_data_xfer_size": 2 << 20,
        "max_dma_maps": 10,
        "pgsizes": 4096 | (2 << 20),
        "write_multiple": True,
        "twin_socket": {"supported": True, "fd_index": 0},
        "migration": {"pgsize": 8192, "max_bitmap_size": 1 << 20},
        "unknown_future_key": {"anything": [1, 2]},
    }
    caps = Capabilities.from_json(obj)
    assert caps == Capabilities(8, 2 << 20, 10, 4096 | (2 << 20), True, TwinSocket(True, 0),
                                MigrationCaps(8192, 1 << 20))
    assert caps.page_size == 4096
    assert Capabilities.from_json({"twin_socket": {}}).twin_socket == TwinSocket(False, None)
    assert Capabilities.from_json({"migration": {}}).migration == MigrationCaps()


def test_to_json_round_trip_and_explicit_limits() -> None:
    caps = Capabilities(8, 2 << 20, 10, 4096 | 8192, True, TwinSocket(True, 1),
                        MigrationCaps(4096, 4096))
    assert Capabilities.from_json(caps.to_json()) == caps
    # every limit is written out, since QEMU's defaults for missing keys differ
    plain = Capabilities().to_json()
    assert plain == {"max_msg_fds": 1, "max_data_xfer_size": 1 << 20, "max_dma_maps": 65535,
                     "pgsizes": 4096}


@pytest.mark.parametrize(
    "obj",
    [
        {"max_msg_fds": True},  # bools are not ints in JSON terms
        {"max_msg_fds": False},
        {"max_data_xfer_size": True},
        {"max_dma_maps": False},
        {"pgsizes": True},
        {"max_msg_fds": "8"},
        {"max_msg_fds": 8.0},
        {"max_msg_fds": None},
        {"pgsizes": [4096]},
        {"write_multiple": 1},
        {"write_multiple": "true"},
        {"write_multiple": None},
        {"twin_socket": True},
        {"twin_socket": []},
        {"twin_socket": {"supported": 1}},
        {"twin_socket": {"supported": True, "fd_index": True}},
        {"twin_socket": {"supported": True, "fd_index": "0"}},
        {"migration": True},
        {"migration": {"pgsize": True}},
        {"migration": {"pgsize": 4096, "max_bitmap_size": 1.5}},
    ],
    ids=repr,
)
def test_type_validation(obj: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        Capabilities.from_json(obj)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    ("obj", "ok"),
    [
        ({"max_msg_fds": 0}, True),
        ({"max_msg_fds": 253}, True),  # SCM_MAX_FD
        ({"max_msg_fds": 254}, False),
        ({"max_msg_fds": -1}, False),
        ({"max_msg_fds": 1 << 64}, False),
        ({"max_data_xfer_size": 1}, True),
        ({"max_data_xfer_size": 64 << 20}, True),
        ({"max_data_xfer_size": (64 << 20) + 1}, False),
        ({"max_data_xfer_size": 0}, False),
        ({"max_data_xfer_size": -5}, False),
        ({"max_dma_maps": 0}, True),
        ({"max_dma_maps": -1}, False),
        ({"pgsizes": 4096 | (1 << 30)}, True),
        ({"pgsizes": 1 << 21}, True),
        ({"pgsizes": 0}, False),
        ({"pgsizes": 2048}, False),
        ({"pgsizes": 4096 | 512}, False),
        ({"pgsizes": -4096}, False),
    ],
    ids=repr,
)
def test_ceilings(obj: dict[str, Any], ok: bool) -> None:
    if ok:
        caps = Capabilities.from_json(obj)
        key, value = next(iter(obj.items()))
        assert getattr(caps, key) == value
    else:
        with pytest.raises(RemoteProtocolError) as info:
            Capabilities.from_json(obj)
        assert info.value.errno == errno.EINVAL


def test_page_size_is_smallest_bit() -> None:
    assert Capabilities(pgsizes=(1 << 21) | (1 << 13)).page_size == 8192
    assert Capabilities(pgsizes=1 << 30).page_size == 1 << 30


SERVER = Capabilities(max_msg_fds=16, max_data_xfer_size=4 << 20, max_dma_maps=100,
                      pgsizes=4096 | (2 << 20), write_multiple=True,
                      migration=MigrationCaps(4096, 1 << 20))


def test_negotiate_server_limits_and_common_page() -> None:
    client = Capabilities(max_msg_fds=8, max_data_xfer_size=1 << 20, max_dma_maps=65535,
                          pgsizes=(2 << 20) | (1 << 30), write_multiple=True,
                          twin_socket=TwinSocket(True), migration=MigrationCaps())
    got = negotiate(client, SERVER)
    assert got.pgsizes == 2 << 20  # the smallest page size both support
    # limits on what the server receives are the server's own
    assert (got.max_msg_fds, got.max_data_xfer_size, got.max_dma_maps) == (16, 4 << 20, 100)
    assert got.write_multiple is True
    assert got.twin_socket is None  # declined
    assert got.migration == SERVER.migration


def test_negotiate_several_common_pages_picks_smallest() -> None:
    client = Capabilities(pgsizes=4096 | (2 << 20) | (1 << 30))
    assert negotiate(client, SERVER).pgsizes == 4096


def test_negotiate_write_multiple_only_when_both() -> None:
    assert negotiate(Capabilities(write_multiple=False), SERVER).write_multiple is False
    no_wm = Capabilities(write_multiple=False)
    assert negotiate(Capabilities(write_multiple=True), no_wm).write_multiple is False
    assert negotiate(Capabilities(write_multiple=True), SERVER).write_multiple is True


def test_negotiate_migration_only_if_client_offered() -> None:
    assert negotiate(Capabilities(), SERVER).migration is None
    offered = Capabilities(migration=MigrationCaps(8192, 1))
    assert negotiate(offered, SERVER).migration == SERVER.migration
    assert negotiate(offered, Capabilities()).migration is None


def test_negotiate_reply_is_a_subset_of_what_client_proposed() -> None:
    client = Capabilities(twin_socket=TwinSocket(True, None))
    got = negotiate(client, SERVER).to_json()
    offered = set(client.to_json())
    assert set(got) <= offered | {"max_msg_fds", "max_data_xfer_size", "max_dma_maps",
                                  "pgsizes"}
    assert "twin_socket" not in got and "migration" not in got and "write_multiple" not in got


def test_negotiate_no_common_page_size() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        negotiate(Capabilities(pgsizes=1 << 21), Capabilities(pgsizes=4096))
    assert info.value.errno == errno.EINVAL


def test_negotiate_keeps_the_answer_for_a_repeated_client() -> None:
    # every connection to a server asks the same: the (frozen) answer is built once
    assert negotiate(Capabilities(pgsizes=4096), SERVER) is negotiate(
        Capabilities(pgsizes=4096), SERVER
    )


def test_negotiate_and_the_version_json_do_not_hash_the_server_caps_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every connection of a server negotiates with the same server object: its answer and
    the reply's JSON are found by identity, without hashing the frozen dataclass (a Python
    call per connect); an equal but distinct object still gets an equal answer."""
    from protocol import Version

    server = replace(SERVER, max_dma_maps=SERVER.max_dma_maps + 1)
    first = negotiate(Capabilities(), server)
    Version(0, 0, first).encode()
    hashed: list[object] = []
    real = Capabilities.__hash__

    def counting(self: Capabilities) -> int:
        hashed.append(self)
        return real(self)

    monkeypatch.setattr(Capabilities, "__hash__", counting)
    again = negotiate(Capabilities(), server)
    assert again is first
    assert Version(0, 0, again).encode() == Version(0, 0, first).encode()
    assert hashed == []
    twin = replace(server)
    assert negotiate(Capabilities(), twin) == first
