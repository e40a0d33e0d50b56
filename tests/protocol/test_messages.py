"""protocol/_messages.py: every body against the spec's tables (docs/interop/vfio-user.rst).

Expected bytes are written by hand from the spec's offset/size tables with `layout()`, never
with the module's own structs, then compared with `encode()`; hand-built bytes are decoded and
their fields checked; every decode error is a RemoteProtocolError with EINVAL carrying the
message's descriptors.
"""

from __future__ import annotations

import errno
import json
import struct
from typing import Any

import pytest

from protocol import (
    DMA_ACCESS_SIZE,
    DMA_MAP_SIZE,
    DMA_UNMAP_SIZE,
    INFO4_SIZE,
    REGION_ACCESS_SIZE,
    REGION_INFO_SIZE,
    REPLIES,
    REQUESTS,
    SET_IRQS_SIZE,
    WRITE_MULTI_MAX,
    Body,
    Capabilities,
    Command,
    DeviceFeature,
    DeviceFeatureReply,
    DeviceGetInfo,
    DeviceGetIrqInfo,
    DeviceGetRegionInfo,
    DeviceGetRegionIoFds,
    DeviceInfo,
    DeviceReset,
    DeviceResetReply,
    DeviceSetIrqs,
    DeviceSetIrqsReply,
    DmaBitmap,
    DmaMap,
    DmaMapReply,
    DmaRead,
    DmaReadReply,
    DmaUnmap,
    DmaUnmapFlags,
    DmaUnmapReply,
    DmaWrite,
    DmaWriteReply,
    Feature,
    FeatureFlags,
    IoFdSubRegion,
    IrqInfo,
    IrqSetFlags,
    MigDataRead,
    MigDataReadReply,
    MigDataWrite,
    MigDataWriteReply,
    MigrationCaps,
    RegionFlags,
    RegionInfo,
    RegionIoFds,
    RegionRead,
    RegionReadReply,
    RegionWrite,
    RegionWriteMulti,
    RegionWriteMultiReply,
    RegionWriteReply,
    RemoteProtocolError,
    SparseMmapCap,
    TypeCap,
    Version,
    VersionReply,
    WriteEntry,
    decode_body,
)

from .helpers import FdToken, fds, layout

U64 = 0xFEDC_BA98_7654_3210
U32 = 0x89AB_CDEF


def dec(body_cls: type[Body], payload: bytes, with_fds: Any = ()) -> Body:
    return decode_body(body_cls.COMMAND, body_cls.IS_REPLY, memoryview(payload), with_fds)


def einval(body_cls: type[Body], payload: bytes, with_fds: Any = ()) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        dec(body_cls, payload, with_fds)
    assert info.value.errno == errno.EINVAL, info.value
    assert [id(f) for f in info.value.fds] == [id(f) for f in with_fds]
    return info.value


# ------------------------------------------------------------------ sizes from the spec


def test_fixed_struct_sizes_match_spec() -> None:
    assert REGION_INFO_SIZE == 32  # "argsz..offset": 4+4+4+4+8+8
    assert INFO4_SIZE == 16  # DEVICE_GET_INFO / GET_IRQ_INFO / GET_REGION_IO_FDS
    assert DMA_MAP_SIZE == 32  # "This structure is 32 bytes in size"
    assert DMA_UNMAP_SIZE == 24
    assert SET_IRQS_SIZE == 20  # data starts at offset 20
    assert REGION_ACCESS_SIZE == 16  # data starts at offset 16
    assert DMA_ACCESS_SIZE == 16
    assert WRITE_MULTI_MAX == 128


def test_registries_cover_every_live_command() -> None:
    live = set(Command) - {Command.DIRTY_PAGES}
    assert set(REQUESTS) == live
    assert set(REPLIES) == live
    for cmd, cls in REQUESTS.items():
        assert cmd == cls.COMMAND and cls.IS_REPLY is False, cls
    for cmd, cls in REPLIES.items():
        assert cmd == cls.COMMAND and cls.IS_REPLY is True, cls


# ------------------------------------------------------------------ spec layouts

# (body, hand-built payload, fds the body carries)
F1 = FdToken()
IRQ_FDS = tuple(fds(3))
CASES: list[tuple[Body, bytes, tuple[Any, ...]]] = [
    # DMA_MAP: argsz 0/4, flags 4/4, offset 8/8, address 16/8, size 24/8
    (
        DmaMap(3, 0x1000, U64, 0x20_0000, fd=F1),
        layout(32, (0, "I", 32), (4, "I", 3), (8, "Q", 0x1000), (16, "Q", U64),
               (24, "Q", 0x20_0000)),
        (F1,),
    ),
    (
        DmaMap(1, 0, 0x8000_0000, 0x1000),
        layout(32, (0, "I", 32), (4, "I", 1), (8, "Q", 0), (16, "Q", 0x8000_0000),
               (24, "Q", 0x1000)),
        (),
    ),
    (DmaMapReply(), b"", ()),
    # DMA_UNMAP: argsz 0/4, flags 4/4, address 8/8, size 16/8
    (
        DmaUnmap(0, U64, 0x4000),
        layout(24, (0, "I", 24), (4, "I", 0), (8, "Q", U64), (16, "Q", 0x4000)),
        (),
    ),
    (
        DmaUnmap(DmaUnmapFlags.ALL, 0, 0),
        layout(24, (0, "I", 24), (4, "I", 2), (8, "Q", 0), (16, "Q", 0)),
        (),
    ),
    (
        DmaUnmapReply(0, 0x1_0000, 0x2000),
        layout(24, (0, "I", 24), (4, "I", 0), (8, "Q", 0x1_0000), (16, "Q", 0x2000)),
        (),
    ),
    # legacy dirty bitmap: struct vfio_user_bitmap {u64 pgsize, u64 size, data[]} at 24
    (
        DmaUnmap(DmaUnmapFlags.GET_DIRTY_BITMAP, 0x10_0000, 0x8000, argsz=24 + 16 + 8,
                 bitmap=DmaBitmap(4096, 8)),
        layout(40, (0, "I", 48), (4, "I", 1), (8, "Q", 0x10_0000), (16, "Q", 0x8000),
               (24, "Q", 4096), (32, "Q", 8)),
        (),
    ),
    (
        DmaUnmapReply(DmaUnmapFlags.GET_DIRTY_BITMAP, 0x10_0000, 0x8000, argsz=48,
                      bitmap=DmaBitmap(4096, 8, b"\x81" + bytes(7))),
        layout(48, (0, "I", 48), (4, "I", 1), (8, "Q", 0x10_0000), (16, "Q", 0x8000),
               (24, "Q", 4096), (32, "Q", 8), (40, "8s", b"\x81" + bytes(7))),
        (),
    ),
    # DEVICE_GET_INFO: argsz, flags, num_regions, num_irqs (request: all but argsz zero)
    (
        DeviceGetInfo(),
        layout(16, (0, "I", 16), (4, "I", 0), (8, "I", 0), (12, "I", 0)),
        (),
    ),
    (
        DeviceInfo(3, 9, 5),
        layout(16, (0, "I", 16), (4, "I", 3), (8, "I", 9), (12, "I", 5)),
        (),
    ),
    # GET_REGION_INFO request: argsz, flags, index, cap_offset, size u64, offset u64
    (
        DeviceGetRegionInfo(7, argsz=0x100),
        layout(32, (0, "I", 0x100), (4, "I", 0), (8, "I", 7), (12, "I", 0), (16, "Q", 0),
               (24, "Q", 0)),
        (),
    ),
    (
        RegionInfo(2, 0x7, 0x1000, 0x3000, fd=F1, argsz=32),
        layout(32, (0, "I", 32), (4, "I", 7), (8, "I", 2), (12, "I", 0), (16, "Q", 0x1000),
               (24, "Q", 0x3000)),
        (F1,),
    ),
    # GET_REGION_IO_FDS: request argsz, flags, index, count
    (
        DeviceGetRegionIoFds(4, argsz=0x200),
        layout(16, (0, "I", 0x200), (4, "I", 0), (8, "I", 4), (12, "I", 0)),
        (),
    ),
    # reply + sub-regions: offset 0/8, size 8/8, fd_index 16/4, type 20/4, flags 24/4,
    # padding 28/4, datamatch 32/8 (40 bytes each)
    (
        RegionIoFds(
            1,
            (IoFdSubRegion(0x10, 4, 0, 0, 1, 0xAB), IoFdSubRegion(0x20, 8, 1, 1, 2, U64)),
            IRQ_FDS[:2],
            argsz=96,
        ),
        layout(16 + 80, (0, "I", 96), (4, "I", 0), (8, "I", 1), (12, "I", 2),
               (16, "Q", 0x10), (24, "Q", 4), (32, "I", 0), (36, "I", 0), (40, "I", 1),
               (44, "I", 0), (48, "Q", 0xAB),
               (56, "Q", 0x20), (64, "Q", 8), (72, "I", 1), (76, "I", 1), (80, "I", 2),
               (84, "I", 0), (88, "Q", U64)),
        IRQ_FDS[:2],
    ),
    # GET_IRQ_INFO: argsz, flags, index, count
    (
        DeviceGetIrqInfo(2),
        layout(16, (0, "I", 16), (4, "I", 0), (8, "I", 2), (12, "I", 0)),
        (),
    ),
    (
        IrqInfo(2, 0xB, 2048),
        layout(16, (0, "I", 16), (4, "I", 0xB), (8, "I", 2), (12, "I", 2048)),
        (),
    ),
    # SET_IRQS: argsz 0, flags 4, index 8, start 12, count 16, data 20 (argsz = whole request)
    (
        DeviceSetIrqs(IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, 2, 1, 3,
                      fd_list=IRQ_FDS, argsz=20),
        layout(20, (0, "I", 20), (4, "I", 0x24), (8, "I", 2), (12, "I", 1), (16, "I", 3)),
        IRQ_FDS,
    ),
    (
        DeviceSetIrqs(IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_MASK, 1, 0, 3,
                      data=b"\x01\x00\x01", argsz=23),
        layout(23, (0, "I", 23), (4, "I", 0xA), (8, "I", 1), (12, "I", 0), (16, "I", 3),
               (20, "3s", b"\x01\x00\x01")),
        (),
    ),
    (
        DeviceSetIrqs(IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 2, 0, 0, argsz=20),
        layout(20, (0, "I", 20), (4, "I", 0x21), (8, "I", 2), (12, "I", 0), (16, "I", 0)),
        (),
    ),
    (DeviceSetIrqsReply(), b"", ()),
    # REGION_READ: offset 0/8, region 8/4, count 12/4 (+ data 16 in the reply)
    (
        RegionRead(U64, 7, 4),
        layout(16, (0, "Q", U64), (8, "I", 7), (12, "I", 4)),
        (),
    ),
    (
        RegionReadReply(0x10, 0, b"\xde\xad\xbe\xef"),
        layout(20, (0, "Q", 0x10), (8, "I", 0), (12, "I", 4), (16, "4s", b"\xde\xad\xbe\xef")),
        (),
    ),
    (
        RegionWrite(0x2000, 1, b"\x11\x22"),
        layout(18, (0, "Q", 0x2000), (8, "I", 1), (12, "I", 2), (16, "2s", b"\x11\x22")),
        (),
    ),
    (
        RegionWriteReply(0x2000, 1, 2),
        layout(16, (0, "Q", 0x2000), (8, "I", 1), (12, "I", 2)),
        (),
    ),
    # DMA_READ / DMA_WRITE: address 0/8, count 8/8 (+ data 16)
    (DmaRead(U64, 0x100), layout(16, (0, "Q", U64), (8, "Q", 0x100)), ()),
    (
        DmaReadReply(0x1000, b"abc"),
        layout(19, (0, "Q", 0x1000), (8, "Q", 3), (16, "3s", b"abc")),
        (),
    ),
    (
        DmaWrite(0x1000, b"wxyz"),
        layout(20, (0, "Q", 0x1000), (8, "Q", 4), (16, "4s", b"wxyz")),
        (),
    ),
    (DmaWriteReply(0x1000, 4), layout(16, (0, "Q", 0x1000), (8, "Q", 4)), ()),
    # DEVICE_RESET: no payload either way
    (DeviceReset(), b"", ()),
    (DeviceResetReply(), b"", ()),
    # REGION_WRITE_MULTI: wr_cnt 0/8, then {offset 0/8, region 8/4, count 12/4, data 16/8}
    (
        RegionWriteMulti((WriteEntry(0x40, 0, b"\x01\x02\x03\x04"),
                          WriteEntry(U64, 2, b"12345678"))),
        layout(8 + 48, (0, "Q", 2),
               (8, "Q", 0x40), (16, "I", 0), (20, "I", 4), (24, "8s", b"\x01\x02\x03\x04"),
               (32, "Q", U64), (40, "I", 2), (44, "I", 8), (48, "8s", b"12345678")),
        (),
    ),
    (RegionWriteMultiReply(2), layout(8, (0, "Q", 2)), ()),
    # DEVICE_FEATURE: argsz 0/4, flags 4/4 (feature 0-15, GET 16, SET 17, PROBE 18), data 8
    (
        DeviceFeature(Feature.MIGRATION | FeatureFlags.GET, argsz=16),
        layout(8, (0, "I", 16), (4, "I", 0x1_0001)),
        (),
    ),
    (
        DeviceFeature(Feature.MIG_DEVICE_STATE | FeatureFlags.SET, struct.pack("<II", 3, 0),
                      argsz=16),
        layout(16, (0, "I", 16), (4, "I", 0x2_0002), (8, "I", 3), (12, "I", 0)),
        (),
    ),
    (
        DeviceFeature(Feature.DMA_LOGGING_START | FeatureFlags.PROBE | FeatureFlags.SET,
                      argsz=8),
        layout(8, (0, "I", 8), (4, "I", 0x6_0006)),
        (),
    ),
    (
        DeviceFeatureReply(Feature.MIGRATION | FeatureFlags.GET, struct.pack("<Q", 0b101),
                           argsz=16),
        layout(16, (0, "I", 16), (4, "I", 0x1_0001), (8, "Q", 0b101)),
        (),
    ),
    # MIG_DATA_READ: argsz 0/4, size 4/4; reply adds data at 8, argsz includes the data
    (MigDataRead(0x1000, argsz=8 + 0x1000), layout(8, (0, "I", 0x1008), (4, "I", 0x1000)), ()),
    (
        MigDataReadReply(b"state"),
        layout(13, (0, "I", 13), (4, "I", 5), (8, "5s", b"state")),
        (),
    ),
    (
        MigDataWrite(b"st", argsz=10),
        layout(10, (0, "I", 10), (4, "I", 2), (8, "2s", b"st")),
        (),
    ),
    (MigDataWriteReply(), b"", ()),
]


@pytest.mark.parametrize(("body", "wire", "carried"), CASES, ids=lambda x: type(x).__name__)
def test_encode_matches_spec_layout(body: Body, wire: bytes, carried: tuple[Any, ...]) -> None:
    assert body.encode() == wire
    assert tuple(body.fds) == carried


@pytest.mark.parametrize(("body", "wire", "carried"), CASES, ids=lambda x: type(x).__name__)
def test_decode_hand_built_bytes(body: Body, wire: bytes, carried: tuple[Any, ...]) -> None:
    got = dec(type(body), wire, carried)
    assert type(got) is type(body)
    assert got == body
    assert all(a is b for a, b in zip(got.fds, carried, strict=True))
    # and back again, byte for byte
    assert got.encode() == wire


def test_feature_property_is_low_16_bits() -> None:
    body = DeviceFeature(Feature.DMA_LOGGING_REPORT | FeatureFlags.GET | FeatureFlags.PROBE)
    assert body.feature == Feature.DMA_LOGGING_REPORT
    assert body.flags >> 16 == 0b101


def test_default_argsz_fills_in_request_size() -> None:
    assert struct.unpack_from("<I", DeviceSetIrqs(0x22, 1, 0, 2, data=b"\1\1").encode())[0] == 22
    assert struct.unpack_from("<I", DeviceFeature(0x1_0001, b"x" * 8).encode())[0] == 16
    assert struct.unpack_from("<I", MigDataRead(100).encode())[0] == 108


def test_mig_data_write_default_argsz_covers_the_data() -> None:
    # libvfio-user's handle_mig_data_write rejects argsz < sizeof(struct) + size
    payload = MigDataWrite(b"abcd").encode()
    assert payload == layout(12, (0, "I", 12), (4, "I", 4), (8, "4s", b"abcd"))


def test_dma_write_reply_may_be_header_only() -> None:
    # QEMU answers DMA_WRITE with the header alone
    assert dec(DmaWriteReply, b"") == DmaWriteReply(0, 0)
    assert DmaWriteReply().encode() == bytes(16)
    assert dec(DmaWriteReply, layout(16, (0, "Q", 5), (8, "Q", 6))) == DmaWriteReply(5, 6)


def test_empty_replies_tolerate_an_echoed_struct() -> None:
    assert dec(DmaMapReply, bytes(32)) == DmaMapReply()
    assert dec(DeviceSetIrqsReply, bytes(20)) == DeviceSetIrqsReply()


def test_set_irqs_data_stops_at_argsz() -> None:
    wire = layout(24, (0, "I", 22), (4, "I", 0x12), (8, "I", 1), (12, "I", 0), (16, "I", 2),
                  (20, "4s", b"\1\0\xff\xff"))
    got = dec(DeviceSetIrqs, wire)
    assert isinstance(got, DeviceSetIrqs)
    assert got.data == b"\1\0" and got.argsz == 22


# ------------------------------------------------------------------ VERSION


def test_version_layout_and_json() -> None:
    caps = Capabilities(max_msg_fds=8, max_data_xfer_size=1 << 20, pgsizes=4096 | (1 << 21),
                        write_multiple=True, migration=MigrationCaps(4096, 1 << 20))
    wire = Version(0, 3, caps).encode()
    assert struct.unpack_from("<HH", wire) == (0, 3)
    assert wire.endswith(b"\0") and wire.count(b"\0", 4) == 1
    assert json.loads(wire[4:-1]) == {
        "capabilities": {
            "max_msg_fds": 8,
            "max_data_xfer_size": 1 << 20,
            "max_dma_maps": 65535,
            "pgsizes": 4096 | (1 << 21),
            "write_multiple": True,
            "migration": {"pgsize": 4096, "max_bitmap_size": 1 << 20},
        }
    }
    assert dec(Version, wire) == Version(0, 3, caps)
    assert dec(VersionReply, wire) == VersionReply(0, 3, caps)


def test_version_decode_hand_built() -> None:
    text = b'{"capabilities":{"max_msg_fds":253,"pgsizes":8192,"future":1},"x":[1]}'
    got = dec(Version, struct.pack("<HH", 1, 2) + text + b"\0")
    assert isinstance(got, Version)
    assert (got.major, got.minor) == (1, 2)
    assert got.capabilities == Capabilities(max_msg_fds=253, pgsizes=8192)
    assert got.raw == json.loads(text)


@pytest.mark.parametrize(
    "data",
    [b"", b"\0", b"{}\0", b'{"capabilities":{}}\0', b'{"capabilities":{}}\0trailing'],
)
def test_version_data_optional_means_defaults(data: bytes) -> None:
    got = dec(Version, struct.pack("<HH", 0, 0) + data)
    assert isinstance(got, Version)
    assert got.capabilities == Capabilities()


@pytest.mark.parametrize(
    "data",
    [
        b"{}",  # not NUL-terminated
        b"{\0",
        b"[]\0",
        b'"caps"\0',
        b'{"capabilities":[]}\0',
        b'{"capabilities":{"max_msg_fds":true}}\0',
        b"\xff\xfe\0",
        b"[" * 100_000 + b"]" * 100_000 + b"\0",  # deep nesting: RecursionError in json
        b'{"capabilities":{"pgsizes":' + b"1" * 5000 + b"}}\0",  # int digit limit
    ],
    ids=["no-nul", "truncated", "array", "string", "caps-array", "bool-int", "utf8", "deep",
         "huge-int"],
)
def test_version_bad_json_is_einval(data: bytes) -> None:
    einval(Version, struct.pack("<HH", 0, 0) + data)


# ------------------------------------------------------------------ region info and caps


SPARSE = SparseMmapCap(((0, 0x1000), (0x3000, 0x2000), (0x8000, 0x8000)))
TYPED = TypeCap(0x8086_0000, 3)


def region_info_with_caps(argsz: int = 112) -> bytes:
    """GET_REGION_INFO reply with a 3-area sparse cap then a type cap, by hand.

    region info 0..32; sparse cap at 32 (header 8, nr_areas/reserved 8, 3 x 16 areas) = 64
    bytes, so its `next` is 96 (relative to the start of the region info); type cap at 96:
    header 8 + type/subtype 8; total 112.
    """
    return layout(
        112,
        (0, "I", argsz), (4, "I", 0xF), (8, "I", 0), (12, "I", 32), (16, "Q", 0x1_0000),
        (24, "Q", 0x40_0000),
        (32, "H", 1), (34, "H", 1), (36, "I", 96), (40, "I", 3), (44, "I", 0),
        (48, "Q", 0), (56, "Q", 0x1000), (64, "Q", 0x3000), (72, "Q", 0x2000),
        (80, "Q", 0x8000), (88, "Q", 0x8000),
        (96, "H", 2), (98, "H", 1), (100, "I", 0), (104, "I", 0x8086_0000), (108, "I", 3),
    )


def full_region() -> RegionInfo:
    return RegionInfo(0, 0xF, 0x1_0000, 0x40_0000, (SPARSE, TYPED), fd=F1)


def test_region_info_caps_encode_matches_spec() -> None:
    info = full_region().fit(4096)
    assert info.argsz == 112 and info.complete
    assert info.encode() == region_info_with_caps()
    assert info.fds == (F1,)


def test_region_info_caps_decode() -> None:
    got = dec(RegionInfo, region_info_with_caps(), (F1,))
    assert isinstance(got, RegionInfo)
    assert got.caps == (SPARSE, TYPED)
    assert got.fd is F1 and got.fds == (F1,)
    assert (got.index, got.flags, got.size, got.offset, got.argsz) == (
        0, 0xF, 0x1_0000, 0x40_0000, 112)
    assert got == full_region().fit(112)


def test_region_info_caps_chain_in_any_order_with_gaps_and_unknown_ids() -> None:
    # type cap first at 40 (after 8 bytes of slack), then an unknown cap (id 3, MSIX
    # mappable: header only) at 56, then a 1-area sparse cap at 64; `next` always absolute
    wire = layout(
        96,
        (0, "I", 96), (4, "I", 0xC), (8, "I", 1), (12, "I", 40), (16, "Q", 0x2000),
        (24, "Q", 0), (32, "Q", 0),
        (40, "H", 2), (42, "H", 1), (44, "I", 56), (48, "I", 1), (52, "I", 2),
        (56, "H", 3), (58, "H", 1), (60, "I", 64),
        (64, "H", 1), (66, "H", 1), (68, "I", 0), (72, "I", 1), (76, "I", 0),
        (80, "Q", 0x1000), (88, "Q", 0x1000),
    )
    got = dec(RegionInfo, wire)
    assert isinstance(got, RegionInfo)
    assert got.caps == (TypeCap(1, 2), SparseMmapCap(((0x1000, 0x1000),)))


def test_region_info_without_caps_clears_caps_flag() -> None:
    info = RegionInfo(7, RegionFlags.READ | RegionFlags.CAPS, 256).fit(32)
    wire = info.encode()
    assert wire == layout(32, (0, "I", 32), (4, "I", 1), (8, "I", 7), (12, "I", 0),
                          (16, "Q", 256), (24, "Q", 0))
    assert info.complete


@pytest.mark.parametrize("client_argsz", [32, 33, 111])
def test_region_info_argsz_too_small_truncates(client_argsz: int) -> None:
    info = full_region().fit(client_argsz)
    assert info.argsz == 112  # the size the full answer needs
    assert not info.complete
    assert info.fds == ()  # no fd with a truncated answer
    wire = info.encode()
    assert len(wire) == 32
    argsz, flags, index, cap_offset, size, offset = struct.unpack("<IIIIQQ", wire)
    assert (argsz, index, cap_offset, size, offset) == (112, 0, 0, 0x1_0000, 0x40_0000)
    got = dec(RegionInfo, wire)
    assert isinstance(got, RegionInfo)
    assert got.argsz == 112 and not got.complete and got.caps == () and got.fd is None
    assert flags & 0x7 == 0x7


@pytest.mark.parametrize("client_argsz", [112, 113, 1 << 20])
def test_region_info_argsz_big_enough_sends_all(client_argsz: int) -> None:
    info = full_region().fit(client_argsz)
    assert info.complete and info.argsz == 112 and info.fds == (F1,)
    assert info.encode() == region_info_with_caps()


def test_region_info_truncated_reply_with_fd_is_rejected() -> None:
    # A truncated reply carries no fd; one that does must not lose it (owned by the caller).
    wire = full_region().fit(32).encode()
    fd = FdToken()
    einval(RegionInfo, wire, (fd,))


@pytest.mark.parametrize(
    "cap_offset_next",
    [
        (8, 0),  # cap inside the region info struct
        (32, 20),  # the second cap would sit inside the region info struct
        (200, 0),  # past the end
        (32, 32),  # next points at itself: a loop
        (108, 0),  # header would run past the end
    ],
)
def test_region_info_bad_cap_chain(cap_offset_next: tuple[int, int]) -> None:
    cap_offset, nxt = cap_offset_next
    wire = bytearray(region_info_with_caps())
    struct.pack_into("<I", wire, 12, cap_offset)
    struct.pack_into("<I", wire, 36, nxt)
    fd = FdToken()
    einval(RegionInfo, bytes(wire), (fd,))


def test_region_info_sparse_areas_past_end() -> None:
    wire = bytearray(region_info_with_caps())
    struct.pack_into("<I", wire, 40, 5)  # nr_areas 5 but only room for 3 (+ the type cap)
    struct.pack_into("<I", wire, 36, 0)
    wire2 = bytearray(wire[:96])
    struct.pack_into("<I", wire2, 0, 96)
    einval(RegionInfo, bytes(wire2), (FdToken(),))


def test_region_info_type_cap_past_end() -> None:
    wire = bytearray(region_info_with_caps()[:104])  # type cap header present, body cut
    struct.pack_into("<I", wire, 0, 104)
    einval(RegionInfo, bytes(wire), (FdToken(),))


def test_region_info_two_fds() -> None:
    einval(RegionInfo, region_info_with_caps(), tuple(fds(2)))


# ------------------------------------------------------------------ write multi limits


def multi(n: int, count: int = 4) -> bytes:
    out = struct.pack("<Q", n)
    for i in range(n):
        out += struct.pack("<QII8s", i * 8, 0, count, b"x" * 8)
    return out


def test_write_multi_limit_128_accepted() -> None:
    got = dec(RegionWriteMulti, multi(WRITE_MULTI_MAX))
    assert isinstance(got, RegionWriteMulti)
    assert len(got.writes) == 128
    assert got.writes[127] == WriteEntry(127 * 8, 0, b"xxxx")


@pytest.mark.parametrize(
    "payload",
    [
        multi(0),
        multi(129),
        multi(2)[:-1],  # size does not match wr_cnt
        multi(2) + b"\0",
        struct.pack("<Q", 2) + multi(3)[8:],
        multi(1, count=0),
        multi(1, count=9),
        struct.pack("<Q", 1 << 63),
    ],
    ids=["zero", "129", "short", "long", "cnt-vs-size", "count-0", "count-9", "huge"],
)
def test_write_multi_errors(payload: bytes) -> None:
    einval(RegionWriteMulti, payload)


def test_write_multi_entry_data_is_padded_to_8() -> None:
    wire = RegionWriteMulti((WriteEntry(0, 1, b"\xaa"),)).encode()
    assert wire == layout(32, (0, "Q", 1), (8, "Q", 0), (16, "I", 1), (20, "I", 1),
                          (24, "8s", b"\xaa" + bytes(7)))


# ------------------------------------------------------------------ error paths, table-driven

# (class, minimum payload size the spec requires)
MINIMUMS: list[tuple[type[Body], int]] = [
    (Version, 4),
    (VersionReply, 4),
    (DmaMap, 32),
    (DmaUnmap, 24),
    (DmaUnmapReply, 24),
    (DeviceGetInfo, 16),
    (DeviceInfo, 16),
    (DeviceGetRegionInfo, 32),
    (RegionInfo, 32),
    (DeviceGetRegionIoFds, 16),
    (RegionIoFds, 16),
    (DeviceGetIrqInfo, 16),
    (IrqInfo, 16),
    (DeviceSetIrqs, 20),
    (RegionRead, 16),
    (RegionReadReply, 16),
    (RegionWrite, 16),
    (RegionWriteReply, 16),
    (DmaRead, 16),
    (DmaReadReply, 16),
    (DmaWrite, 16),
    (RegionWriteMulti, 8),
    (RegionWriteMultiReply, 8),
    (DeviceFeature, 8),
    (DeviceFeatureReply, 8),
    (MigDataRead, 8),
    (MigDataReadReply, 8),
    (MigDataWrite, 8),
]


@pytest.mark.parametrize(("cls", "minimum"), MINIMUMS, ids=lambda x: getattr(x, "__name__", x))
def test_short_payloads_are_einval(cls: type[Body], minimum: int) -> None:
    for n in range(minimum):
        err = einval(cls, bytes(n))
        assert err.fds == []
    # ... and the fds that came with a short message come back in the error
    carried = tuple(fds(1))
    einval(cls, bytes(minimum - 1), carried)


ARGSZ_BELOW_MINIMUM: list[tuple[type[Body], bytes]] = [
    (DmaMap, layout(32, (0, "I", 31), (4, "I", 3), (8, "Q", 0), (16, "Q", 0), (24, "Q", 4096))),
    (DmaUnmap, layout(24, (0, "I", 23), (4, "I", 0), (8, "Q", 0), (16, "Q", 4096))),
    (DeviceGetInfo, layout(16, (0, "I", 15), (4, "I", 0), (8, "I", 0), (12, "I", 0))),
    (DeviceGetRegionInfo, layout(32, (0, "I", 31), (4, "I", 0), (8, "I", 0), (12, "I", 0),
                                 (16, "Q", 0), (24, "Q", 0))),
    (DeviceGetRegionIoFds, layout(16, (0, "I", 15), (4, "I", 0), (8, "I", 0), (12, "I", 0))),
    (DeviceGetIrqInfo, layout(16, (0, "I", 0), (4, "I", 0), (8, "I", 0), (12, "I", 0))),
    (DeviceSetIrqs, layout(20, (0, "I", 19), (4, "I", 0x21), (8, "I", 0), (12, "I", 0),
                           (16, "I", 0))),
    (DeviceFeature, layout(8, (0, "I", 7), (4, "I", 0x1_0001))),
    (MigDataRead, layout(8, (0, "I", 7), (4, "I", 0))),
    (MigDataWrite, layout(8, (0, "I", 0), (4, "I", 0))),
]


@pytest.mark.parametrize(("cls", "wire"), ARGSZ_BELOW_MINIMUM, ids=lambda x: getattr(
    x, "__name__", "bytes"))
def test_argsz_below_minimum_is_einval(cls: type[Body], wire: bytes) -> None:
    einval(cls, wire)
    einval(cls, wire, (FdToken(),))


COUNT_MISMATCHES: list[tuple[type[Body], bytes]] = [
    (RegionWrite, layout(18, (0, "Q", 0), (8, "I", 0), (12, "I", 3), (16, "2s", b"ab"))),
    (RegionWrite, layout(18, (0, "Q", 0), (8, "I", 0), (12, "I", 1), (16, "2s", b"ab"))),
    (RegionReadReply, layout(17, (0, "Q", 0), (8, "I", 0), (12, "I", 0), (16, "1s", b"a"))),
    (DmaReadReply, layout(16, (0, "Q", 0), (8, "Q", 1))),
    (DmaWrite, layout(17, (0, "Q", 0), (8, "Q", 2), (16, "1s", b"a"))),
    (MigDataReadReply, layout(10, (0, "I", 10), (4, "I", 3), (8, "2s", b"ab"))),
    (MigDataWrite, layout(10, (0, "I", 10), (4, "I", 1), (8, "2s", b"ab"))),
    (RegionRead, layout(20, (0, "Q", 0), (8, "I", 0), (12, "I", 4), (16, "4s", b"abcd"))),
    (DeviceSetIrqs, layout(20, (0, "I", 21), (4, "I", 0x22), (8, "I", 0), (12, "I", 0),
                           (16, "I", 1))),
    (RegionIoFds, layout(16, (0, "I", 56), (4, "I", 0), (8, "I", 0), (12, "I", 1))),
]


@pytest.mark.parametrize(("cls", "wire"), COUNT_MISMATCHES, ids=lambda x: getattr(
    x, "__name__", "bytes"))
def test_count_mismatches_are_einval(cls: type[Body], wire: bytes) -> None:
    einval(cls, wire)


def test_reserved_bits() -> None:
    # DEVICE_FEATURE flags above PROBE are undefined
    einval(DeviceFeature, layout(8, (0, "I", 8), (4, "I", 1 << 19 | 1)))
    # GET_REGION_IO_FDS: "The client must set flags to zero"
    einval(DeviceGetRegionIoFds, layout(16, (0, "I", 16), (4, "I", 1), (8, "I", 0),
                                        (12, "I", 0)))


def test_dma_unmap_bitmap_header_missing() -> None:
    einval(DmaUnmap, layout(24, (0, "I", 40), (4, "I", 1), (8, "Q", 0), (16, "Q", 4096)))


def test_dma_map_more_than_one_fd() -> None:
    wire = DmaMap(3, 0, 0, 4096).encode()
    einval(DmaMap, wire, tuple(fds(2)))


# every body that takes no descriptor rejects them and hands them back
VALID_NO_FD: list[Body] = [
    body for body, _wire, carried in CASES if not carried
    and type(body) not in (DmaMap, RegionInfo, RegionIoFds, DeviceSetIrqs)
] + [Version(0, 0), VersionReply(0, 0)]


@pytest.mark.parametrize("body", VALID_NO_FD, ids=lambda b: type(b).__name__)
def test_fds_on_a_message_that_takes_none(body: Body) -> None:
    carried = tuple(fds(2))
    einval(type(body), body.encode(), carried)


@pytest.mark.parametrize("command", [0, 14, 19, 0x7FFF, 0xFFFF])
@pytest.mark.parametrize("is_reply", [False, True])
def test_unknown_command_is_enotsup(command: int, is_reply: bool) -> None:
    carried = tuple(fds(1))
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(command, is_reply, memoryview(b""), carried)
    assert info.value.errno == errno.ENOTSUP
    assert info.value.fds == list(carried)


def test_version_json_is_parsed_once_per_text() -> None:
    # QEMU sends the same JSON on every connection: parsed once, each body its own `raw`
    payload = memoryview(struct.pack("<HH", 0, 0) + b'{"capabilities":{"max_msg_fds":8}}\0')
    a, b = Version.decode(payload, ()), Version.decode(payload, ())
    assert a.capabilities is b.capabilities and a.capabilities.max_msg_fds == 8
    assert a.raw == b.raw and a.raw is not b.raw
    bad = memoryview(struct.pack("<HH", 0, 0) + b'{"capabilities": 5}\0')
    for _ in range(2):  # a refused text is refused every time (not kept)
        with pytest.raises(RemoteProtocolError, match="capabilities is not an object"):
            Version.decode(bad, ())
