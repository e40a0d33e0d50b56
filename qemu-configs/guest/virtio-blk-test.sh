#!/bin/sh
# virtio-blk-test.sh: the guest's own virtio_blk driver does I/O on the first virtio disk.
#
# Runs as /test.sh against QEMU's built-in `virtio-blk-pci` or our virtio-blk behind
# vfio-user-pci; "RESULT key=value" lines must be identical for both. The disk must be at
# least 32 MiB and its first 4 MiB must hold the data the host test wrote there (the host
# knows the checksum); the test copies them to 8 MiB with O_DIRECT, so the host can check
# the backing file afterwards, and discards 16-17 MiB.
# Knobs (kernel cmdline words):
#   vfu_bench=N   after the checks, N rounds of 32 MiB O_DIRECT write + read (BENCH lines)
#   vfu_idle=S    then S seconds without I/O between "PHASE idle start" and "... end"

res()  { echo "RESULT $1=$2"; }
info() { echo "INFO $*"; }
FAILED=0
fail() { echo "RESULT $1=FAIL${2:+ ($2)}"; FAILED=1; }

DEV=""
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/vendor")" = 0x1af4 ] && [ "$(cat "$d/class")" = 0x010000 ]; then
        DEV=$d
    fi
done
[ -n "$DEV" ] || { fail found "no virtio block function"; exit 1; }
res found yes
res pci_id "$(cat "$DEV/vendor"):$(cat "$DEV/device")"
res driver "$(basename "$(readlink "$DEV/driver")")"
info "bdf=${DEV##*/} irq=$(cat "$DEV/irq") msi_irqs=$(ls "$DEV/msi_irqs" 2>/dev/null | wc -l)"
for v in /sys/bus/virtio/devices/*; do
    info "virtio ${v##*/} device=$(cat "$v/device") features=$(cat "$v/features")"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do usleep 100000; i=$((i + 1)); done
[ -b /dev/vda ] || { fail disk "no /dev/vda"; exit 1; }
res disk vda
res sectors "$(cat /sys/block/vda/size)"
res logical_block "$(cat /sys/block/vda/queue/logical_block_size)"
# what the driver made of the device's limits (compared by hand between ours and QEMU's)
q=/sys/block/vda/queue
info "queue max_segments=$(cat $q/max_segments) max_segment_size=$(cat $q/max_segment_size)" \
    "max_sectors_kb=$(cat $q/max_sectors_kb) max_hw_sectors_kb=$(cat $q/max_hw_sectors_kb)" \
    "nr_requests=$(cat $q/nr_requests) write_cache=$(cat $q/write_cache)" \
    "mq=$(ls /sys/block/vda/mq 2>/dev/null | wc -l)"

now_ns() { sed -n 's/^now at \([0-9]*\) nsecs$/\1/p' /proc/timer_list | head -n 1; }
md5() { dd if=/dev/vda bs=1M skip="$1" count="$2" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1; }

# 1. read what the host wrote
res read_md5 "$(md5 0 4)"
# 2. copy it to 8 MiB with O_DIRECT, flush, read back
if dd if=/dev/vda of=/dev/vda bs=1M count=4 seek=8 iflag=direct oflag=direct 2>/dev/null; then
    res copy ok
else
    fail copy "dd failed"
fi
sync
res copy_md5 "$(md5 8 4)"
# 3. a buffered write from tmpfs, flushed with fsync, then read back bypassing the cache
dd if=/dev/vda of=/tmp/chunk bs=1M count=1 iflag=direct 2>/dev/null
dd if=/tmp/chunk of=/dev/vda bs=1M seek=12 conv=fsync 2>/dev/null && res fsync_write ok
echo 3 > /proc/sys/vm/drop_caches
res buffered_md5 "$(md5 12 1)"
# 4. discard 1 MiB at 16 MiB (after filling it) and read zeroes back
dd if=/tmp/chunk of=/dev/vda bs=1M seek=16 oflag=direct 2>/dev/null
if blkdiscard -o $((16 << 20)) -l $((1 << 20)) /dev/vda 2>/dev/null; then
    res discard ok
    zero=$(dd if=/dev/zero bs=1M count=1 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$(md5 16 1)" = "$zero" ] && res discard_zeroes yes || res discard_zeroes no
else
    res discard unsupported
fi
echo "STAGE checks-done"

# 5. optional throughput rounds at 32-64 MiB (not RESULT lines: timings differ). PHASE
# lines mark each timed part for the host (it samples the server's CPU time at each one);
# ios = requests the disk completed (/sys/block/vda/stat fields 1 and 5).
ios() { set -- $(cat /sys/block/vda/stat); echo "$1 $5"; }
# interrupts the guest took on the disk's MSI-X vectors (all CPUs, all its lines)
irqs() { awk '/virtio/ { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i } END { print n + 0 }' /proc/interrupts; }
rounds=${vfu_bench:-0}
r=0
while [ "$r" -lt "$rounds" ]; do
    r=$((r + 1))
    set -- $(ios); r0=$1; w0=$2
    i0=$(irqs)
    echo "PHASE write start"
    t0=$(now_ns)
    dd if=/dev/zero of=/dev/vda bs=1M count=32 seek=32 oflag=direct 2>/dev/null
    t1=$(now_ns)
    echo "PHASE write end"
    i1=$(irqs)
    echo "PHASE read start"
    t2=$(now_ns)
    dd if=/dev/vda of=/dev/null bs=1M count=32 skip=32 iflag=direct 2>/dev/null
    t3=$(now_ns)
    echo "PHASE read end"
    i2=$(irqs)
    set -- $(ios)
    echo "BENCH round=$r bytes=$((32 << 20)) write_ns=$((t1 - t0)) read_ns=$((t3 - t2))" \
        "write_ios=$(($2 - w0)) read_ios=$(($1 - r0))" \
        "write_irqs=$((i1 - i0)) read_irqs=$((i2 - i1))"
done
# 6. optional idle time (vfu_idle=S seconds, no I/O): the host checks the server sleeps
if [ "${vfu_idle:-0}" -gt 0 ]; then
    echo "PHASE idle start"
    sleep "$vfu_idle"
    echo "PHASE idle end"
fi
res failed "$FAILED"
exit "$FAILED"
