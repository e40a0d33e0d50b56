#!/bin/sh
# edu-test.sh: drive QEMU's "edu" teaching device (docs/specs/edu.rst) from a busybox guest.
#
# Runs as /test.sh in the vfiouser-srv test guest, against QEMU's built-in `-device edu` or
# against our edu model behind vfio-user-pci. Lines "RESULT key=value" are deterministic and
# must be identical for both; "INFO ..." lines are for humans (addresses, listings).
#
# Needs: kernel cmdline `memmap=8K$0xf000000` (two reserved RAM pages for DMA; edu's DMA
# mask is 28 bits, so they must sit below 256 MiB) and the uio_pci_generic module.
# Knobs (kernel cmdline words `name=value` arrive as environment variables):
#   vfu_edu_steps=ident,regs,fact,dma,irq   which steps to run, in order; also: command,
#                                           sizes, reset, pause
#   vfu_dma_page=0xf000000                  physical address of the reserved pages
#   vfu_pause=5                             seconds the `pause` step waits

STEPS=$(echo "${vfu_edu_steps:-ident,regs,fact,dma,irq}" | tr ',' ' ')
DMA_PAGE=$((${vfu_dma_page:-0xf000000}))
EDU_BUF=$((0x40000))           # the device's internal 4 KiB DMA buffer
DMA_BYTES=64
FAILED=0

res()  { echo "RESULT $1=$2"; }
info() { echo "INFO $*"; }
fail() { echo "RESULT $1=FAIL${2:+ ($2)}"; FAILED=1; }
hex8() { printf '%08x' "$1"; }
rd()   { hex8 "$(devmem $((BAR0 + $1)) 32)"; }          # 32-bit BAR0 read, 8 hex digits
wr()   { devmem $((BAR0 + $1)) 32 $(($2)); }             # 32-bit BAR0 write
# rdw WIDTH OFFSET / wrw WIDTH OFFSET VALUE: a BAR0 access of 8, 16, 32 or 64 bits; the read
# is devmem's own output (0x and WIDTH/4 hex digits), lower-cased. VALUE is passed verbatim
# (no shell arithmetic, which would turn a 64-bit value with the top bit set negative).
rdw()  { devmem $((BAR0 + $2)) "$1" | tr 'A-F' 'a-f'; }
wrw()  { devmem $((BAR0 + $2)) "$1" "$3"; }
ramrd() { hex8 "$(devmem $(($1)) 32)"; }
ramwr() { devmem $(($1)) 32 $(($2)); }

# wait_clear OFFSET MASK: poll a register until (value & MASK) == 0, at most ~5 s.
wait_clear() {
    i=0
    while [ $(( 0x$(rd "$1") & $2 )) -ne 0 ]; do
        i=$((i + 1))
        [ $i -gt 5000 ] && return 1
        usleep 1000
    done
    return 0
}

find_dev() {
    DEV=""
    for d in /sys/bus/pci/devices/*; do
        if [ "$(cat "$d/vendor")" = 0x1234 ] && [ "$(cat "$d/device")" = 0x11e8 ]; then
            DEV=$d
            break
        fi
    done
    [ -n "$DEV" ]
}

cfg_rd16() { hexdump -s "$1" -n 2 -e '1/2 "%04x"' "$DEV/config"; }
cfg_wr16() {
    v=$(($2))
    printf "\\$(printf %03o $((v & 0xff)))\\$(printf %03o $((v >> 8)))" |
        dd of="$DEV/config" bs=2 seek=$(($1 / 2)) count=1 conv=notrunc 2>/dev/null
}

step_ident() {
    for d in /sys/bus/pci/devices/*; do
        info "pci ${d##*/} $(cat "$d/vendor"):$(cat "$d/device") class=$(cat "$d/class")"
    done
    if ! find_dev; then fail found "no 1234:11e8 in /sys/bus/pci/devices"; exit 1; fi
    res found yes
    for f in vendor device class revision subsystem_vendor subsystem_device; do
        res "$f" "$(cat "$DEV/$f")"
    done
    set -- $(head -n 1 "$DEV/resource")
    BAR0=$(($1))
    info "bdf=${DEV##*/} bar0=$1-$2 flags=$3 irq=$(cat "$DEV/irq")"
    res bar0_size "$(hex8 $(($2 - $1 + 1)))"
    res bar0_flags "$3"
    [ "$(cat "$DEV/enable")" = 0 ] && echo 1 > "$DEV/enable"
    cfg_wr16 4 $((0x$(cfg_rd16 4) | 0x6))          # memory space + bus master
    info "command=$(cfg_rd16 4)"
    res command_mem_bm "$(printf %04x $((0x$(cfg_rd16 4) & 0x6)))"
    res id "$(rd 0x00)"
}

step_regs() {
    for v in 0x12345678 0x00000000 0xffffffff; do
        wr 0x04 "$v"
        res "liveness($(hex8 $((v))))" "$(rd 0x04)"
    done
}

step_fact() {
    for n in 0 1 5 10 12 13; do
        wr 0x08 "$n"
        if wait_clear 0x20 0x1; then res "fact($n)" "$(rd 0x08)"; else fail "fact($n)" timeout; fi
    done
}

# dma SRC DST COUNT CMD: program the engine and wait for it to finish.
dma() {
    wr 0x80 "$1"; wr 0x88 "$2"; wr 0x90 "$3"; wr 0x98 "$4"
    wait_clear 0x98 0x1
}

step_dma() {
    n=$((DMA_BYTES / 4))
    i=0
    while [ $i -lt $n ]; do
        ramwr $((DMA_PAGE + 4 * i)) $(((0x0badf00d + i * 0x11111111) & 0xffffffff))
        ramwr $((DMA_PAGE + 0x1000 + 4 * i)) 0
        i=$((i + 1))
    done
    if dma $DMA_PAGE $EDU_BUF $DMA_BYTES 1; then res dma_to_dev done; else fail dma_to_dev timeout; fi
    if dma $EDU_BUF $((DMA_PAGE + 0x1000)) $DMA_BYTES 3; then
        res dma_to_ram done
    else
        fail dma_to_ram timeout
    fi
    i=0
    bad=""
    while [ $i -lt $n ]; do
        want=$(hex8 $(((0x0badf00d + i * 0x11111111) & 0xffffffff)))
        got=$(ramrd $((DMA_PAGE + 0x1000 + 4 * i)))
        if [ "$got" != "$want" ]; then bad="word $i: got $got want $want"; break; fi
        i=$((i + 1))
    done
    info "dma first words: $(ramrd $((DMA_PAGE + 0x1000))) $(ramrd $((DMA_PAGE + 0x1004)))"
    if [ -z "$bad" ]; then res dma ok; else fail dma "$bad"; fi
    res dma_bytes "$DMA_BYTES"
}

# wait_irq NAME: read the uio interrupt count (blocking read, 5 s timeout). Not busybox
# `timeout`: its watchdog child keeps /dev/uioN open for 5 s, and the last close of that file
# makes uio_pci_generic clear Bus Master, which would break a later DMA step.
wait_irq() {
    rm -f /tmp/irqcnt
    dd bs=4 count=1 <&3 >/tmp/irqcnt 2>/dev/null &
    rp=$!
    i=0
    while kill -0 $rp 2>/dev/null && [ $i -lt 50 ]; do usleep 100000; i=$((i + 1)); done
    kill $rp 2>/dev/null
    wait $rp 2>/dev/null
    cnt=$(od -An -tu4 /tmp/irqcnt 2>/dev/null | tr -d ' ')
    if [ -n "$cnt" ]; then res "$1" "$cnt"; else fail "$1" "no interrupt within 5 s"; fi
}

# irq_done NAME: show and acknowledge the device's status, then unmask INTx. uio_pci_generic
# masks INTx (command bit 10, Interrupt Disable) in its handler and has no irqcontrol, so a
# write to /dev/uioN fails: user space clears the bit in config space (see the UIO howto).
irq_done() {
    st=$(rd 0x24)
    res "$1_status" "$st"
    wr 0x64 "0x$st"
    res "$1_status_acked" "$(rd 0x24)"
    cfg_wr16 4 $((0x$(cfg_rd16 4) & ~0x400))
}

step_irq() {
    if [ ! -d /sys/bus/pci/drivers/uio_pci_generic ]; then
        modprobe uio_pci_generic || { fail irq "no uio_pci_generic"; return; }
    fi
    echo "1234 11e8" > /sys/bus/pci/drivers/uio_pci_generic/new_id 2>/dev/null
    [ -e "$DEV/driver" ] || echo "${DEV##*/}" > /sys/bus/pci/drivers/uio_pci_generic/bind
    res driver "$(basename "$(readlink "$DEV/driver")")"
    uio=$(ls "$DEV/uio" 2>/dev/null | head -n 1)
    if [ -z "$uio" ]; then fail irq "uio_pci_generic did not bind (INTx masking?)"; return; fi
    cfg_wr16 4 $((0x$(cfg_rd16 4) | 0x6))          # binding may have changed the command
    exec 3<"/dev/$uio"                              # open first: later interrupts count
    wr 0x60 0x1                                     # raise, status |= 1
    wait_irq irq
    irq_done irq
    wr 0x20 0x80                                    # factorial raises irq 0x1 when done
    wr 0x08 4
    wait_irq irq_fact
    res "fact(4)" "$(rd 0x08)"
    irq_done irq_fact
    wr 0x20 0
    dma $DMA_PAGE $EDU_BUF 4 5                      # DMA with completion irq 0x100
    wait_irq irq_dma
    irq_done irq_dma
    exec 3<&-                                       # note: closing clears bus master
}

step_reset() {
    if [ ! -e "$DEV/reset" ]; then fail reset "no $DEV/reset (device not behind a port?)"; return; fi
    info "reset methods: $(cat "$DEV/reset_method" 2>/dev/null)"
    if echo 1 > "$DEV/reset"; then res reset ok; else fail reset "write failed"; fi
    cfg_wr16 4 $((0x$(cfg_rd16 4) | 0x6))
}

# command: which Command register bits the device keeps. QEMU gives every emulated device the
# same write mask (hw/pci/pci.c, pci_init_wmask): I/O Space, Memory Space, Bus Master, SERR#
# Enable and Interrupt Disable, whether or not the device has an I/O BAR. Each bit is set
# alone on top of the current value, then all of them and none; the value is restored after.
step_command() {
    orig=$((0x$(cfg_rd16 4)))
    res status "$(cfg_rd16 6)"
    for bit in 0x0001 0x0008 0x0010 0x0040 0x0080 0x0100 0x0200 0x0400; do
        cfg_wr16 4 $((orig | bit))
        res "command(+$(printf %04x $((bit))))" "$(cfg_rd16 4)"
        cfg_wr16 4 $orig
    done
    cfg_wr16 4 0xffff
    res "command(ffff)" "$(cfg_rd16 4)"
    cfg_wr16 4 0
    res "command(0000)" "$(cfg_rd16 4)"
    cfg_wr16 4 $orig
    res command_restored "$(cfg_rd16 4)"
}

# sizes: 8/16/32/64-bit reads and writes at and between the register offsets. edu accepts
# 4-byte accesses below 0x80 and 4 or 8 bytes from 0x80 (anything else it answers with all
# ones); QEMU's memory core rejects an access smaller than 4 bytes or not aligned to its size
# before edu sees it (edu_mmio_ops.valid), and such a read returns 0. An access that is not
# aligned reaches the device in aligned pieces (TCG splits it), the same for both devices.
step_sizes() {
    cfg_wr16 4 $((0x$(cfg_rd16 4) | 0x2))           # memory space (a driver may have left)
    wr 0x04 0x12345678                              # liveness reads back edcba987
    wrw 64 0x80 0x1122334455667788                  # DMA source/destination/count: 64 bits
    wrw 64 0x88 0x99aabbccddeeff00
    wrw 64 0x90 0x0000000000000040
    for off in 0x00 0x01 0x02 0x03 0x04 0x06 0x08 0x0c 0x20 0x24 0x40 0x60 0x64 \
               0x7c 0x80 0x82 0x84 0x88 0x8c 0x90 0x98 0x9c 0xa0 0x40000; do
        for w in 8 16 32 64; do
            res "rd$w($off)" "$(rdw $w $off)"
        done
    done
    # Writes the size rules drop: liveness keeps edcba987, status and irq_status stay 0.
    for w in 8 16; do
        wrw $w 0x04 0x55
        res "liveness(wr$w)" "$(rd 0x04)"
        wrw $w 0x20 0x80
        res "status(wr$w)" "$(rd 0x20)"
        wrw $w 0x60 0x1
        res "irq_status(wr$w)" "$(rd 0x24)"
        wrw $w 0x80 0x77
        res "dma_src(wr$w)" "$(rdw 64 0x80)"
    done
    wrw 64 0x00 0x0000000300000002                  # 64 bits below 0x80: edu ignores it
    res "liveness(wr64@0)" "$(rd 0x04)"
    wrw 64 0x04 0x0000000500000002                  # unaligned: liveness and factorial
    if wait_clear 0x20 0x1; then res "fact(wr64@4)" "$(rd 0x08)"; else fail "fact(wr64@4)" timeout; fi
    res "liveness(wr64@4)" "$(rd 0x04)"
    wrw 32 0x84 0x12345678                          # no register at 0x84: ignored
    res "dma_src(wr32@84)" "$(rdw 64 0x80)"
    wrw 32 0x80 0xaabbccdd                          # 4 bytes at 0x80 clear the high half
    res "dma_src(wr32)" "$(rdw 64 0x80)"
    wrw 64 0x90 0xfedcba9876543210
    res "dma_cnt(wr64)" "$(rdw 64 0x90)"
}

step_pause() {
    echo "STAGE pause ${vfu_pause:-5}"
    sleep "${vfu_pause:-5}"
    echo "STAGE resume"
}

for s in $STEPS; do
    info "step $s"
    "step_$s"
done
res failed "$FAILED"
exit $FAILED
