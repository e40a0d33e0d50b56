"""protocol/_errors.py: the error hierarchy and what each error carries."""

from __future__ import annotations

import errno

from protocol import FatalProtocolError, LocalProtocolError, ProtocolError, RemoteProtocolError

from .helpers import fds


def test_hierarchy() -> None:
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(LocalProtocolError, ProtocolError)
    # a broken stream is the peer's fault too, so handlers of Remote see it
    assert issubclass(FatalProtocolError, RemoteProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)


def test_defaults_and_fds_are_a_private_list() -> None:
    err = RemoteProtocolError("bad")
    assert err.errno == errno.EINVAL and err.fds == [] and str(err) == "bad"
    given = tuple(fds(2))
    err = FatalProtocolError("worse", errno.EPROTO, given)
    assert err.errno == errno.EPROTO
    assert isinstance(err.fds, list) and err.fds == list(given)
    source = fds(1)
    err = LocalProtocolError("mine", fds=source)
    source.append(object())
    assert len(err.fds) == 1  # a copy: later changes by the raiser do not leak in
