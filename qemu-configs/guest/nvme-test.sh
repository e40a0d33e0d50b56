#!/bin/sh
# nvme-test.sh: the guest's own nvme driver does block I/O on the first NVMe controller.
#
# Runs as /test.sh against QEMU's built-in `-device nvme` or our NVMe model behind
# vfio-user-pci; "RESULT key=value" lines must be identical for both (same image size).
# The first namespace must be at least 32 MiB. Data written is a pattern the host can
# rebuild: the line "vfiouser nvme pattern seed $SEED" repeated, cut to 4 MiB.
# Knobs (kernel cmdline words `vfu_name=value` arrive as variables):
#   vfu_nvme_steps=ident,pattern,discard   steps, in order; also `verify` (a second boot
#                                          checks what `pattern` wrote), `ns2` and
#                                          `reset` (controller reset under I/O), `flr`
#                                          (PCI function reset with the driver bound)
#   vfu_seed=1                             pattern seed
#   vfu_bench=N                            N rounds of throughput measurements (BENCH lines)
#   vfu_bench_mib=32                       MiB per sequential round
#   vfu_bench_idle=5                       seconds of idle guest after the rounds

res()  { echo "RESULT $1=$2"; }
info() { echo "INFO $*"; }
FAILED=0
fail() { echo "RESULT $1=FAIL${2:+ ($2)}"; FAILED=1; }

STEPS=$(echo "${vfu_nvme_steps:-ident,pattern,discard}" | tr ',' ' ')
SEED=${vfu_seed:-1}
DISK=/dev/nvme0n1
MIB=1048576

md5() { dd if="${3:-$DISK}" bs=1M skip="$1" count="$2" iflag=direct 2>/dev/null |
        md5sum | cut -d' ' -f1; }
zero_md5() { dd if=/dev/zero bs=1M count="$1" 2>/dev/null | md5sum | cut -d' ' -f1; }
make_pattern() { yes "vfiouser nvme pattern seed $SEED" | head -c $((4 * MIB)) > /tmp/pat; }
# nanoseconds since boot, from the one clock busybox can read at that resolution
now_ns() { awk '/^now at/ { print $3; exit }' /proc/timer_list; }

# the block device of namespace ID $1
disk_of() {
    for b in /sys/block/nvme0n*; do
        [ "$(cat "$b/nsid")" = "$1" ] && echo "/dev/${b##*/}" && return
    done
}

step_ident() {
    DEV=""
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat "$d/class")" = 0x010802 ] && DEV=$d && break
    done
    [ -n "$DEV" ] || { fail found "no NVMe function (class 010802)"; exit 1; }
    res found yes
    res driver "$(basename "$(readlink "$DEV/driver")")"
    info "bdf=${DEV##*/} id=$(cat "$DEV/vendor"):$(cat "$DEV/device") irq=$(cat "$DEV/irq")" \
         "msi_irqs=$(ls "$DEV/msi_irqs" 2>/dev/null | wc -l)"
    i=0
    while [ ! -b $DISK ] && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
    [ -b $DISK ] || { fail disk "no $DISK"; exit 1; }
    # namespaces appear one by one: wait until their number holds still for 0.3 s
    n=0; same=0; i=0
    while [ $same -lt 3 ] && [ $i -lt 50 ]; do
        m=$(ls -d /sys/block/nvme0n* | wc -l)
        [ "$m" = "$n" ] && same=$((same + 1)) || same=0
        n=$m; i=$((i + 1)); usleep 100000
    done
    c=/sys/class/nvme/nvme0
    info "model='$(cat $c/model)' serial='$(cat $c/serial)' fw='$(cat $c/firmware_rev)'" \
         "queues=$(ls -d /sys/block/nvme0n1/mq/* | wc -l)"
    res namespaces "$(ls -d /sys/block/nvme0n* | wc -l)"
    # keyed by NSID: the driver scans namespaces concurrently, so nvme0n1 need not be NSID 1
    for b in /sys/block/nvme0n*; do
        n=ns$(cat "$b/nsid")
        res "${n}_bytes" $(($(cat "$b/size") * 512))
        res "${n}_logical_block" "$(cat "$b/queue/logical_block_size")"
    done
    DISK=$(disk_of 1)
    b=/sys/block/${DISK##*/}
    res write_cache "$(cat "$b/queue/write_cache" | tr ' ' _)"
    # what the block layer makes of the controller (differences change the I/O pattern)
    q=$b/queue
    info "queue: max_sectors_kb=$(cat $q/max_sectors_kb) max_hw_sectors_kb=$(cat $q/max_hw_sectors_kb)" \
         "max_segments=$(cat $q/max_segments) max_segment_size=$(cat $q/max_segment_size)" \
         "nr_requests=$(cat $q/nr_requests) fua=$(cat $q/fua 2>/dev/null)" \
         "optimal_io_size=$(cat $q/optimal_io_size) io_poll=$(cat $q/io_poll 2>/dev/null)" \
         "virt_boundary_mask=$(cat $q/virt_boundary_mask 2>/dev/null)" \
         "hw_queues=$(ls -d $b/mq/* | wc -l) irqs=$(grep -c nvme /proc/interrupts)"
    [ "$(cat "$b/queue/discard_max_bytes")" -gt 0 ] && res discard_max yes ||
        res discard_max no
}

step_pattern() {
    make_pattern
    res pattern_md5 "$(md5sum < /tmp/pat | cut -d' ' -f1)"
    # O_DIRECT at 0, and through the page cache with fsync at 8 MiB
    dd if=/tmp/pat of=$DISK bs=1M oflag=direct 2>/dev/null && res direct_write ok ||
        fail direct_write
    dd if=/tmp/pat of=$DISK bs=1M seek=8 conv=fsync 2>/dev/null && res fsync_write ok ||
        fail fsync_write
    echo 3 > /proc/sys/vm/drop_caches
    res readback_md5 "$(md5 0 4)"
    res readback_fsync_md5 "$(md5 8 4)"
    # small unaligned-to-MiB transfers: 4 KiB blocks scattered over the pattern
    dd if=$DISK of=/tmp/small bs=4k skip=3 count=5 iflag=direct 2>/dev/null
    res small_read_md5 "$(md5sum < /tmp/small | cut -d' ' -f1)"
}

step_verify() {
    make_pattern
    res verify_md5 "$(md5 0 4)"
    res pattern_md5 "$(md5sum < /tmp/pat | cut -d' ' -f1)"
}

step_discard() {
    make_pattern
    dd if=/tmp/pat of=$DISK bs=1M seek=16 count=1 oflag=direct 2>/dev/null
    if blkdiscard -o $((16 * MIB)) -l $MIB $DISK 2>/dev/null; then
        res discard ok
        [ "$(md5 16 1)" = "$(zero_md5 1)" ] && res discard_zeroes yes || res discard_zeroes no
    else
        res discard unsupported
    fi
}

step_ns2() {
    ns2=$(disk_of 2)
    [ -n "$ns2" ] || { fail ns2 "no namespace 2"; return; }
    make_pattern
    dd if=/tmp/pat of="$ns2" bs=1M count=2 oflag=direct 2>/dev/null
    res ns2_md5 "$(md5 0 2 "$ns2")"
    res ns1_untouched "$( [ "$(md5 0 2)" != "$(md5 0 2 "$ns2")" ] && echo yes || echo no)"
}

# controller reset while a 16 MiB O_DIRECT write is in flight: the driver re-queues what
# was aborted, so the write completes and the data is all there
step_reset() {
    make_pattern
    for i in 1 2 3 4; do cat /tmp/pat; done > /tmp/pat16
    dd if=/tmp/pat16 of=$DISK bs=64k seek=$((24 * 16)) oflag=direct 2>/dev/null &
    pid=$!
    usleep 20000
    echo 1 > /sys/class/nvme/nvme0/reset_controller && res reset_issued yes
    wait $pid && res reset_io ok || fail reset_io "dd failed"
    echo 3 > /proc/sys/vm/drop_caches
    [ "$(md5 24 16)" = "$(md5sum < /tmp/pat16 | cut -d' ' -f1)" ] && res reset_data ok ||
        fail reset_data "read back differs"
    res reset_state "$(cat /sys/class/nvme/nvme0/state)"
}

# PCI function reset with the driver bound (sysfs `reset`: the driver quiesces, the function
# is reset, which QEMU turns into DEVICE_RESET, and the driver brings the controller back)
step_flr() {
    dev=$(readlink -f /sys/class/nvme/nvme0/device)
    echo 1 > "$dev/reset" && res flr_issued yes || fail flr_issued
    i=0
    while [ "$(cat /sys/class/nvme/nvme0/state)" != live ] && [ $i -lt 100 ]; do
        usleep 100000; i=$((i + 1))
    done
    res flr_state "$(cat /sys/class/nvme/nvme0/state)"
    make_pattern
    dd if=/tmp/pat of=$DISK bs=1M seek=40 oflag=direct 2>/dev/null
    [ "$(md5 40 4)" = "$(md5sum < /tmp/pat | cut -d' ' -f1)" ] && res flr_io ok ||
        fail flr_io "read back differs"
}

# BENCH lines: bytes, nanoseconds and completed I/Os per measurement, for the host to turn
# into ratios. "PHASE name start|end" lines bracket each measurement so the host can sample
# its own processes' CPU time around it (benchmarks/nvme_guest.py); "idle" is a few
# seconds with no I/O at all.
# completed reads + writes of the disk so far (/sys/block/X/stat fields 1 and 5)
ios() { set -- $(cat "/sys/block/${DISK##*/}/stat"); echo $(($1 + $5)); }
# the guest's own counters: nvme interrupts, all interrupts, context switches, and the
# /proc/stat CPU ticks (user system idle iowait irq softirq), and the ms the disk's I/Os
# spent from submission to completion, summed (/sys/block/X/stat); `diag` prints the change
# since `snap` as a DIAG line (outside the timed span: it forks)
snap() {
    S0=$(awk '/nvme/ { for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) n += $i }
              END { printf "%d ", n }' /proc/interrupts
         awk '/^cpu / { printf "%d %d %d %d %d %d ", $2 + $3, $4, $5, $6, $7, $8 }
              /^intr/ { printf "%d ", $2 } /^ctxt/ { printf "%d ", $2 }' /proc/stat
         awk '{ printf "%d", $4 + $8 }' "/sys/block/${DISK##*/}/stat")
}
diag() {
    old=$S0; snap
    echo "$old $S0" | awk -v p="$1" -v r="$2" '{ h = NF / 2; split("nvme_irqs user sys idle iowait irq softirq intr ctxt io_ms", k)
        printf "DIAG round=%s phase=%s", r, p
        for (i = 1; i <= h; i++) printf " %s=%d", k[i], $(i + h) - $i; print "" }'
}
phase() { echo "PHASE $1 $2"; }

bench() {
    rounds=${vfu_bench:-0}
    mib=${vfu_bench_mib:-32}
    blocks=$(( $(cat "/sys/block/${DISK##*/}/size") / 8 ))
    r=0
    while [ "$r" -lt "$rounds" ]; do
        r=$((r + 1))
        snap
        phase seq_write start
        i0=$(ios); t0=$(now_ns)
        dd if=/dev/zero of=$DISK bs=1M count="$mib" seek=32 oflag=direct 2>/dev/null
        t1=$(now_ns); i1=$(ios)
        phase seq_write end
        diag seq_write $r
        phase seq_read start
        t1r=$(now_ns)
        dd if=$DISK of=/dev/null bs=1M count="$mib" skip=32 iflag=direct 2>/dev/null
        t2=$(now_ns); i2=$(ios)
        phase seq_read end
        diag seq_read $r
        phase rand_read_4k start
        t2r=$(now_ns)
        n=0
        while [ $n -lt 200 ]; do
            dd if=$DISK of=/dev/null bs=4k count=1 skip=$(( (n * 7919 + r * 104729) % blocks )) \
                iflag=direct 2>/dev/null
            n=$((n + 1))
        done
        t3=$(now_ns); i3=$(ios)
        phase rand_read_4k end
        diag rand_read_4k $r
        # the same loop without I/O: process start-up cost, subtracted on the host
        n=0
        while [ $n -lt 200 ]; do
            dd if=/dev/zero of=/dev/null bs=4k count=1 2>/dev/null
            n=$((n + 1))
        done
        t4=$(now_ns)
        echo "BENCH round=$r seq_write bytes=$((mib * MIB)) ns=$((t1 - t0)) ios=$((i1 - i0))"
        echo "BENCH round=$r seq_read bytes=$((mib * MIB)) ns=$((t2 - t1r)) ios=$((i2 - i1))"
        echo "BENCH round=$r rand_read_4k ops=200 ns=$((t3 - t2r)) baseline_ns=$((t4 - t3))" \
             "ios=$((i3 - i2))"
    done
    if [ "$rounds" -gt 0 ]; then
        i0=$(ios)
        phase idle start
        sleep "${vfu_bench_idle:-5}"
        phase idle end
        echo "BENCH round=0 idle s=${vfu_bench_idle:-5} ios=$(($(ios) - i0))"
    fi
}

for s in $STEPS; do
    echo "STAGE $s"
    "step_$s"
done
echo "STAGE checks-done"
bench
res failed "$FAILED"
exit "$FAILED"
