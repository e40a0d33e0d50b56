"""Generate the tables of docs/protocol.md from the code, so the docs cannot drift from it.

``python -m vfiouser_srv.docgen`` rewrites every generated section of docs/protocol.md;
``--check`` only compares and exits 1 when a section is stale (``make lint`` runs it, and
tests/protocol/test_docs.py fails on a stale file). A section is the text between
``<!-- BEGIN GENERATED name ... -->`` and ``<!-- END GENERATED name -->``; everything else in
the file is written by hand and left alone.

This lives outside ``protocol/`` because it reads and writes files; ``protocol/`` stays
sans-IO. It reads a few private names of ``protocol`` on purpose: the tables it renders are
the very data the code runs on.
"""

from __future__ import annotations

import re
import struct
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from protocol import (
    HEADER_SIZE,
    MAX_VERSION_SIZE,
    PHASE_TABLE,
    REPLIES,
    REQUESTS,
    WRITE_MULTI_MAX,
    Body,
    Capabilities,
    Command,
    Connection,
    MigState,
    Phase,
    Role,
    Step,
)
from protocol import _caps as caps_mod
from protocol import _connection as connection_mod
from protocol import _migration as migration_mod
from protocol import _region as region_mod
from protocol._fixed import FixedBody, is_reserved

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
COMMAND = "python -m vfiouser_srv.docgen"

_TYPES = {"B": "u8", "H": "u16", "I": "u32", "Q": "u64"}


def _type(fmt: str) -> str:
    """Struct format of one field as the spec writes it (u32, u8[8])."""
    if fmt.endswith("s"):
        return f"u8[{fmt[:-1]}]"
    return _TYPES[fmt]


# ------------------------------------------------------------------------------ phases


def render_phases() -> str:
    """PHASE_TABLE as rows; CLOSE rows collapse to one per role when every phase has one."""
    rows = ["| role | in phase | step | next phase |", "|---|---|---|---|"]
    for role in Role:
        for (r, phase, step), nxt in PHASE_TABLE.items():
            if r is role and step is not Step.CLOSE:
                rows.append(f"| {role.value} | `{phase.value}` | {step.value} | `{nxt.value}` |")
        closes = {p for (r, p, s), n in PHASE_TABLE.items()
                  if r is role and s is Step.CLOSE and n is Phase.CLOSED}
        if closes == set(Phase):
            rows.append(f"| {role.value} | any | {Step.CLOSE.value} | `{Phase.CLOSED.value}` |")
        else:  # pragma: no cover - today every phase may close
            rows += [f"| {role.value} | `{p.value}` | close | `closed` |" for p in sorted(
                closes, key=lambda p: p.value)]
    return "\n".join(rows)


# ------------------------------------------------------------------------------ limits


def render_limits() -> str:
    """The numbers that bound what a peer can make this layer buffer, parse or hold."""
    default = Connection(Role.SERVER)
    headroom = connection_mod._STRUCT_HEADROOM
    rows = [
        "| limit | value | where |",
        "|---|---|---|",
        f"| message header | {HEADER_SIZE} bytes | `HEADER_SIZE` |",
        f"| largest message before VERSION completes (the VERSION exchange itself) | "
        f"{MAX_VERSION_SIZE} bytes | `MAX_VERSION_SIZE`, `Connection(max_version_size=...)` |",
        f"| largest message once READY | {HEADER_SIZE} + {headroom} + `max_data_xfer_size` "
        "(our own, from `local_caps`) | `Connection` |",
        f"| descriptors per message (default `local_caps.max_msg_fds`) | "
        f"{default.local_caps.max_msg_fds} | `Connection(local_caps=...)` |",
        f"| `max_msg_fds` a peer may announce | 0..{caps_mod.MAX_MSG_FDS_CEILING} (SCM_MAX_FD) "
        "| `Capabilities` |",
        f"| `max_data_xfer_size` a peer may announce | 1..{caps_mod.MAX_DATA_XFER_CEILING} "
        "bytes | `Capabilities` |",
        f"| writes per REGION_WRITE_MULTI | 1..{WRITE_MULTI_MAX} | `WRITE_MULTI_MAX` |",
        f"| capabilities followed in a GET_REGION_INFO reply | {region_mod._MAX_CAPS} "
        "(a longer chain is a loop) | `RegionInfo.decode` |",
    ]
    return "\n".join(rows)


def render_capabilities() -> str:
    """Defaults for capabilities a peer leaves out of VERSION (the spec's defaults)."""
    c = Capabilities()
    rows = ["| capability | default when absent |", "|---|---|"]
    rows += [
        f"| `max_msg_fds` | {c.max_msg_fds} |",
        f"| `max_data_xfer_size` | {c.max_data_xfer_size} |",
        f"| `max_dma_maps` | {c.max_dma_maps} |",
        f"| `pgsizes` | {c.pgsizes:#x} |",
        f"| `write_multiple` | {str(c.write_multiple).lower()} |",
        "| `twin_socket` | absent (declined by `negotiate`) |",
        f"| `migration` | absent; inside it `pgsize` {caps_mod.MigrationCaps().pgsize}, "
        f"`max_bitmap_size` {caps_mod.MigrationCaps().max_bitmap_size} |",
    ]
    return "\n".join(rows)


# ------------------------------------------------------------------------------ bodies


def _fields(cls: type[Body]) -> str:
    parts = []
    offset = 0
    for name, fmt in cls.FIELDS:
        cell = f"{offset} `{name}` {_type(fmt)}"
        if issubclass(cls, FixedBody) and is_reserved(cls, name):
            cell += " (0)" if name not in cls.ZERO else " (must be 0)"
        parts.append(cell)
        offset += _size(fmt)
    return "<br>".join(parts) if parts else "none"


def _size(fmt: str) -> int:
    return struct.calcsize("<" + fmt)


def _tail(cls: type[Body]) -> str:
    if issubclass(cls, FixedBody) and cls.DATA is not None:
        if cls.DATA == "rest":
            return "`data`: the rest of the payload"
        return f"`data`: `{cls.DATA}` bytes (must match)"
    return cls.TAIL_DOC or "nothing (trailing bytes are ignored)"


def _fds(cls: type[Body]) -> str:
    if issubclass(cls, FixedBody):
        return "none" if cls.MAX_FDS == 0 else f"0..{cls.MAX_FDS} (`fd`)"
    return cls.FDS_DOC or "none"


def _rules(cls: type[Body]) -> str:
    if not issubclass(cls, FixedBody):
        if not cls.FIELDS:
            return "no descriptors"
        return f"hand-written (`protocol/{cls.__module__.rsplit('.', 1)[-1]}.py`)"
    if cls.MAY_BE_EMPTY:
        rules = [f"shorter than {cls.SIZE} bytes: the defaults"]
    elif cls.EXACT:
        rules = [f"exactly {cls.SIZE} bytes"]
    else:
        rules = [f"≥ {cls.SIZE} bytes"]
    if cls.ARGSZ_MIN:
        rules.append(f"argsz ≥ {cls.SIZE}")
    rules += [f"`{name}` = 0" for name in cls.ZERO]
    if cls.FLAGS_MASK is not None:
        rules.append(f"`flags` ⊆ {cls.FLAGS_MASK:#x}")
    return ", ".join(rules)


def render_bodies() -> str:
    """One row per command and direction: the layout and the checks made on receipt."""
    rows = [
        "| # | command | body | fixed part (offset, field, type) | size | then | fds "
        "| checked on receipt |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cmd in sorted(set(REQUESTS) | set(REPLIES)):
        for table, kind in ((REQUESTS, "request"), (REPLIES, "reply")):
            cls = table[cmd]
            rows.append(
                f"| {cmd} | {Command(cmd).name} {kind} | `{cls.__name__}` | {_fields(cls)} | "
                f"{cls.SIZE} | {_tail(cls)} | {_fds(cls)} | {_rules(cls)} |"
            )
    return "\n".join(rows)


# ------------------------------------------------------------------------------ migration


def render_migration() -> str:
    """The states, the direct arcs, and the path taken for every settable (from, to)."""
    m = migration_mod
    rows = ["| value | state | a client may ask for it | saving |", "|---|---|---|---|"]
    for s in MigState:
        rows.append(f"| {int(s)} | `{s.name}` | {'yes' if s in m.SETTABLE_STATES else 'no'} | "
                    f"{'yes' if s in m.SAVING_STATES else ''} |")
    rows += ["", "Direct arcs (the ones a server implements): " + ", ".join(
        f"`{a.name}`→`{b.name}`" for a, b in sorted(m.DIRECT_ARCS))]
    rows += ["", "Forbidden outright: " + ", ".join(
        f"`{a.name}`→`{b.name}`" for a, b in sorted(m.FORBIDDEN))]
    states = sorted(m.SETTABLE_STATES)
    rows += ["", "`transition_path(from, to)`: the states a transition steps through, with "
             "PRE_COPY supported (the last one is the target; `no` = not allowed):", ""]
    rows.append("| from \\ to | " + " | ".join(f"`{s.name}`" for s in states) + " |")
    rows.append("|---" * (len(states) + 1) + "|")
    for a in states:
        cells = []
        for b in states:
            if a == b:
                cells.append("")
                continue
            path = m.PATHS_WITH_PRE_COPY.get((a, b))
            cells.append("no" if path is None else " → ".join(s.name for s in path))
        rows.append(f"| `{a.name}` | " + " | ".join(cells) + " |")
    differ = [(a, b) for (a, b), p in m.PATHS_WITHOUT_PRE_COPY.items()
              if m.PATHS_WITH_PRE_COPY.get((a, b)) != p]
    missing = sorted(set(m.PATHS_WITH_PRE_COPY) - set(m.PATHS_WITHOUT_PRE_COPY))
    rows += ["", "Without PRE_COPY (`transition_path(..., pre_copy=False)`) these are not "
             "allowed: " + (", ".join(f"`{a.name}`→`{b.name}`" for a, b in missing) or "none")
             + "; paths that differ: " + (", ".join(
                 f"`{a.name}`→`{b.name}`" for a, b in sorted(differ)) or "none") + "."]
    return "\n".join(rows)


# ------------------------------------------------------------------------------ the file

SECTIONS: dict[str, Callable[[], str]] = {
    "phases": render_phases,
    "limits": render_limits,
    "capabilities": render_capabilities,
    "bodies": render_bodies,
    "migration": render_migration,
}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- BEGIN GENERATED {name}\b[^>]*-->\n)(.*?)(<!-- END GENERATED {name} -->)",
        re.DOTALL,
    )


def render(text: str) -> str:
    """`text` with every generated section replaced by what the code says today."""
    for name, make in SECTIONS.items():
        found = _pattern(name).search(text)
        if found is None:
            raise ValueError(f"docs/protocol.md: section {name!r} has no GENERATED markers")
        body = make().rstrip("\n") + "\n"
        text = text[: found.start(2)] + body + text[found.end(2) :]
    return text


def stale_sections(path: Path = DOC) -> list[str]:
    """Names of the sections of `path` that differ from what the code would generate."""
    text = path.read_text()
    out = []
    for name, make in SECTIONS.items():
        found = _pattern(name).search(text)
        if found is None or found.group(2) != make().rstrip("\n") + "\n":
            out.append(name)
    return out


def main(argv: Sequence[str]) -> int:
    """``[--check] [PATH]``: rewrite (or only check) the generated sections."""
    args = [a for a in argv if a != "--check"]
    path = Path(args[0]) if args else DOC
    if "--check" in argv:
        stale = stale_sections(path)
        if stale:
            print(f"{path}: generated sections out of date: {', '.join(stale)}; run `{COMMAND}`")
            return 1
        print(f"{path}: generated sections up to date")
        return 0
    text = path.read_text()
    new = render(text)
    if new != text:
        path.write_text(new)
        print(f"{path}: updated")
    else:
        print(f"{path}: already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
