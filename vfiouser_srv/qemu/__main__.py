"""``python -m vfiouser_srv.qemu setup|run|docs ...`` (same as ``vfiouser-srv qemu``)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
