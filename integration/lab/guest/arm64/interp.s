// A tiny Arm64 guest kernel for xendmop's integration tests: the same table of IO records as
// the x86 guest (../interp.s, written by integration/xenlab.py's Script), MMIO only.
//
// xl loads it as an arm64 "Image" (the header below; Xen's tools/libs/guest/xg_dom_armzimageloader.c
// checks the magic and puts it at the guest's RAM base plus text_offset) and starts it at EL1,
// MMU off, so every access is to a guest-physical address.  For each record it does the MMIO
// (1, 2, 4 or 8 bytes), and echoes what a read returned with a 4-byte write to REPORT + 4 +
// 4 * record index: a guest/Xen pair with no way to print still shows its results to the ioreq
// server that serves REPORT (a release build of Xen refuses HYPERVISOR_console_io writes from a
// guest: xen/include/xsm/dummy.h, xsm_console_io, allows them only with CONFIG_VERBOSE_DEBUG).
// A read whose record asks for a check (aux bit 0) that differs counts as a failure; so does any
// port-IO record (Arm has no port IO).  At the end it writes the failure count to REPORT and
// powers off with SCHEDOP_shutdown (hvc #0xEA1, the hypercall number in x16: Xen's
// xen/arch/arm/traps.c, do_trap_hypercall).
//
// A record is five 32-bit words: op, width, addr, value, aux (see ../interp.s).  The generated
// script.s defines REPORT (.equ) and the records at `script`.  Built with `as` / `ld -T
// guest.ld` / `objcopy -O binary` from a native arm64 binutils (dom0's) by xenlab.build_guest.

        .equ OP_END, 0
        .equ OP_MMIO_WRITE, 3
        .equ OP_MMIO_READ, 4
        .equ OP_LOOP, 8
        .equ RECORD, 20
        .equ HYPERVISOR_sched_op, 29
        .equ SCHEDOP_shutdown, 2
        .equ XEN_HYPERCALL_TAG, 0xEA1

        .include "script.s"

        .text
        .globl _start
_start:
        // arm64 Image header (Linux Documentation/arch/arm64/booting.rst)
        b       start                   // code0
        .long   0                       // code1
        .quad   0x80000                 // text_offset: linked at RAM base + 512 KiB
        .quad   image_end - _start      // image_size
        .quad   0                       // flags: little-endian
        .quad   0, 0, 0                 // res2..res4
        .ascii  "ARM\x64"               // magic
        .long   0                       // res5

start:
        adr     x19, script             // the current record
        mov     x20, #0                 // failures
        mov     x21, #0                 // the current record's index
        mov     x22, #0                 // a loop record's runs left (0: not armed)
        ldr     x23, =REPORT

next:
        ldp     w0, w1, [x19]           // op, width
        ldp     w2, w3, [x19, #8]       // addr, value
        ldr     w4, [x19, #16]          // aux
        cmp     w0, #OP_END
        b.eq    done
        cmp     w0, #OP_MMIO_WRITE
        b.eq    do_write
        cmp     w0, #OP_MMIO_READ
        b.eq    do_read
        cmp     w0, #OP_LOOP
        b.eq    do_loop
        add     x20, x20, #1            // port IO or anything else: not on Arm
advance:
        add     x19, x19, #RECORD
        add     x21, x21, #1
        b       next

do_write:
        cmp     w1, #1
        b.ne    1f
        strb    w3, [x2]
        b       advance
1:      cmp     w1, #2
        b.ne    2f
        strh    w3, [x2]
        b       advance
2:      str     w3, [x2]
        b       advance

do_read:
        cmp     w1, #1
        b.ne    1f
        ldrb    w5, [x2]
        b       3f
1:      cmp     w1, #2
        b.ne    2f
        ldrh    w5, [x2]
        b       3f
2:      ldr     w5, [x2]
3:      tbz     w4, #0, 4f              // no check asked for
        cmp     w5, w3
        b.eq    4f
        add     x20, x20, #1
4:      add     x6, x23, #4
        str     w5, [x6, x21, lsl #2]   // echo: REPORT + 4 + 4 * index
        b       advance

do_loop:
        cbnz    x22, 1f
        sub     w22, w3, #1             // armed: the body runs `value` times in all
        cbz     x22, 2f
        b       3f
1:      sub     x22, x22, #1
        cbz     x22, 2f
3:      mov     w21, w2                 // jump back to record `addr`
        mov     x6, #RECORD
        adr     x19, script
        madd    x19, x21, x6, x19
        b       next
2:      mov     x22, #0
        b       advance

done:
        str     w20, [x23]              // the failure count: the last thing the server sees
        dsb     sy
        mov     x0, #SCHEDOP_shutdown
        adr     x1, shutdown_reason
        mov     x16, #HYPERVISOR_sched_op
        hvc     #XEN_HYPERCALL_TAG
1:      wfi
        b       1b

        .ltorg
        .balign 8
shutdown_reason:
        .long   0                       // SHUTDOWN_poweroff
