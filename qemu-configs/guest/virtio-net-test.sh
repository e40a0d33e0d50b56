#!/bin/sh
# virtio-net-test.sh: the guest's own virtio_net driver talks to a host peer over a TAP.
#
# Runs as /test.sh against QEMU's built-in `virtio-net-pci` (TAP netdev) or our virtio-net
# behind vfio-user-pci; "RESULT key=value" lines must be identical for both. The host side
# (tests/integration/test_virtio_guest.py) owns a network namespace with the TAP and
# address 10.99.0.1/24 in it, and a peer there that pings the guest, then per round keeps
# connecting to the guest's TCP 5001 until it listens, sends its data (10 MiB) and closes,
# and accepts one connection on TCP 5002 whose data it checksums. The guest receives on
# 5001 and sends what it received back to 5002, so both directions carry the same bytes.
# Timings (BENCH lines) are the guest's own, from /proc/timer_list; the receive time starts
# when the guest listens, so it includes up to one connect retry (10 ms) of the peer.
# PHASE lines mark the timed parts for the host (it samples the server's CPU time there).
# Knobs: vfu_host=10.99.0.1 vfu_guest=10.99.0.2 vfu_rounds=1 vfu_idle=0 (seconds idle at the end)

HOST=${vfu_host:-10.99.0.1}
GUEST=${vfu_guest:-10.99.0.2}
ROUNDS=${vfu_rounds:-1}
res()  { echo "RESULT $1=$2"; }
info() { echo "INFO $*"; }
FAILED=0
fail() { echo "RESULT $1=FAIL${2:+ ($2)}"; FAILED=1; }
now_ns() { sed -n 's/^now at \([0-9]*\) nsecs$/\1/p' /proc/timer_list | head -n 1; }

DEV=""
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/vendor")" = 0x1af4 ] && [ "$(cat "$d/class")" = 0x020000 ]; then
        DEV=$d
    fi
done
[ -n "$DEV" ] || { fail found "no virtio network function"; exit 1; }
res found yes
res pci_id "$(cat "$DEV/vendor"):$(cat "$DEV/device")"
res driver "$(basename "$(readlink "$DEV/driver")")"
for v in /sys/bus/virtio/devices/*; do
    info "virtio ${v##*/} device=$(cat "$v/device") features=$(cat "$v/features")"
done
IF=""
i=0
while [ -z "$IF" ] && [ $i -lt 50 ]; do
    IF=$(ls "$DEV"/virtio*/net 2>/dev/null | head -n 1)
    [ -z "$IF" ] && usleep 100000
    i=$((i + 1))
done
[ -n "$IF" ] || { fail netdev "no network interface"; exit 1; }
res netdev "$IF"
res mac "$(cat /sys/class/net/$IF/address)"
res mtu "$(cat /sys/class/net/$IF/mtu)"
ip addr add "$GUEST/24" dev "$IF"
ip link set "$IF" up
i=0
while [ "$(cat /sys/class/net/$IF/carrier 2>/dev/null)" != 1 ] && [ $i -lt 50 ]; do
    usleep 100000; i=$((i + 1))
done
res carrier "$(cat /sys/class/net/$IF/carrier)"
if ping -c 3 -W 5 "$HOST" >/tmp/ping 2>&1; then res ping_host ok; else
    fail ping_host "$(tail -n 2 /tmp/ping | tr '\n' ' ')"; fi

# interrupts the guest took on the NIC's MSI-X vectors (all CPUs, all its lines)
irqs() { awk '/virtio/ { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i } END { print n + 0 }' /proc/interrupts; }
r=0
while [ "$r" -lt "$ROUNDS" ]; do
    r=$((r + 1))
    rm -f /tmp/rx
    nc -l -p 5001 > /tmp/rx &
    pid=$!
    usleep 200000
    echo "STAGE listen round=$r"
    i0=$(irqs)
    echo "PHASE rx start"
    t0=$(now_ns)
    wait $pid
    t1=$(now_ns)
    echo "PHASE rx end"
    i1=$(irqs)
    res rx_bytes "$(wc -c < /tmp/rx)"
    res rx_md5 "$(md5sum < /tmp/rx | cut -d' ' -f1)"
    echo "STAGE send round=$r"
    echo "PHASE tx start"
    t2=$(now_ns)
    if nc "$HOST" 5002 < /tmp/rx; then res send ok; else fail send "nc exit $?"; fi
    t3=$(now_ns)
    echo "PHASE tx end"
    i2=$(irqs)
    echo "BENCH round=$r bytes=$(wc -c < /tmp/rx) rx_ns=$((t1 - t0)) tx_ns=$((t3 - t2))" \
        "rx_irqs=$((i1 - i0)) tx_irqs=$((i2 - i1))"
done
# optional idle time (vfu_idle=S seconds, no traffic): the host checks the server sleeps
if [ "${vfu_idle:-0}" -gt 0 ]; then
    echo "PHASE idle start"
    sleep "$vfu_idle"
    echo "PHASE idle end"
fi
ip -s link show "$IF" | sed 's/^/INFO /'
res failed "$FAILED"
exit "$FAILED"
