#!/bin/sh
# Provision QEMU (>= 10.1 with vfio-user-pci) and the test guest into the cache
# (~/.cache/vfiouser-srv, or $VFIOUSER_SRV_CACHE, or --cache DIR). Idempotent; fast when warm.
# All the work is in vfiouser_srv/qemu/provision.py; this only picks the repo's python.
set -e
repo=$(cd "$(dirname "$0")/.." && pwd)
py="$repo/.venv/bin/python"
[ -x "$py" ] || py=python3
cd "$repo"
exec "$py" -m vfiouser_srv.qemu setup "$@"
