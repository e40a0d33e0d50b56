"""Namespace storage is the SDK's block backend (`devices/sdk/storage.py`), shared with
virtio-blk so the durability rules of docs/durability.md are written once; these names stay
importable from here for code that imported them before the two backends were merged."""

from devices.sdk.storage import BlockBackend as Backend
from devices.sdk.storage import FileBackend, MemoryBackend, consume

__all__ = ["Backend", "FileBackend", "MemoryBackend", "consume"]
