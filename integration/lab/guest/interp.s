# A tiny PVH guest kernel for xendmop's integration tests: a table-driven interpreter of IO.
#
# Xen starts it in 32-bit protected mode, paging off, at the address given by the
# XEN_ELFNOTE_PHYS32_ENTRY note below (see Xen's public elfnote.h and
# arch-x86/hvm/start_info.h).  It walks the records of `script` (assembled in from the
# generated script.s, written by integration/xenlab.py), does each IO, prints results on
# Xen's debug port 0xe9 (one line each, visible in `xl dmesg` as "(dN) ..."), then powers
# itself off with SCHEDOP_shutdown.
#
# A record is five 32-bit words: op, width (1/2/4 bytes), addr (port or guest-physical
# address), value, aux.  Reads print "r IDX VALUE ok|BAD EXPECTED" when aux bit 0 asks for a
# check, else "r IDX VALUE".  String IO: value = element count, aux = address of the data
# (outs) or of the expected data (ins, 0 = no check).  The last line is
# "xendmop-guest done FAILS".  A loop record jumps back: addr = the record index to jump to,
# value = how many times the body runs in all (>= 1; loops do not nest).  Assembled with
# `as --32`, linked with `ld -m elf_i386`.

        .equ OP_END, 0
        .equ OP_OUT, 1
        .equ OP_IN, 2
        .equ OP_MMIO_WRITE, 3
        .equ OP_MMIO_READ, 4
        .equ OP_OUTS, 5
        .equ OP_INS, 6
        .equ OP_PRINT, 7
        .equ OP_LOOP, 8
        .equ RECORD, 20
        .equ DEBUG_PORT, 0xe9
        .equ HYPERVISOR_sched_op, 29
        .equ SCHEDOP_shutdown, 2

        .code32

        # ELF note: name "Xen", type 18 = XEN_ELFNOTE_PHYS32_ENTRY, descriptor = entry address.
        .section .note.Xen, "a", @note
        .balign 4
        .long 4, 4, 18
        .asciz "Xen"
        .long start

        .text
        .globl start
start:
        cli
        cld
        movl $stack_top, %esp
        call hypercall_setup
        movl $script, %ebp
next:
        movl 0(%ebp), %eax
        cmpl $OP_END, %eax
        je done
        cmpl $OP_OUT, %eax
        je do_out
        cmpl $OP_IN, %eax
        je do_in
        cmpl $OP_MMIO_WRITE, %eax
        je do_mmio_write
        cmpl $OP_MMIO_READ, %eax
        je do_mmio_read
        cmpl $OP_OUTS, %eax
        je do_outs
        cmpl $OP_INS, %eax
        je do_ins
        cmpl $OP_PRINT, %eax
        je do_print
        cmpl $OP_LOOP, %eax
        je do_loop
        movl $msg_badop, %esi
        call puts
        incl fails
        jmp done
advance:
        addl $RECORD, %ebp
        incl index
        jmp next

do_out:
        movl 8(%ebp), %edx
        movl 12(%ebp), %eax
        movl 4(%ebp), %ecx
        cmpl $1, %ecx
        jne 1f
        outb %al, %dx
        jmp advance
1:      cmpl $2, %ecx
        jne 2f
        outw %ax, %dx
        jmp advance
2:      outl %eax, %dx
        jmp advance

do_in:
        movl 8(%ebp), %edx
        movl 4(%ebp), %ecx
        xorl %eax, %eax
        cmpl $1, %ecx
        jne 1f
        inb %dx, %al
        jmp report_read
1:      cmpl $2, %ecx
        jne 2f
        inw %dx, %ax
        jmp report_read
2:      inl %dx, %eax
        jmp report_read

do_mmio_write:
        movl 8(%ebp), %edi
        movl 12(%ebp), %eax
        movl 4(%ebp), %ecx
        cmpl $1, %ecx
        jne 1f
        movb %al, (%edi)
        jmp advance
1:      cmpl $2, %ecx
        jne 2f
        movw %ax, (%edi)
        jmp advance
2:      movl %eax, (%edi)
        jmp advance

do_mmio_read:
        movl 8(%ebp), %edi
        movl 4(%ebp), %ecx
        cmpl $1, %ecx
        jne 1f
        movzbl (%edi), %eax
        jmp report_read
1:      cmpl $2, %ecx
        jne 2f
        movzwl (%edi), %eax
        jmp report_read
2:      movl (%edi), %eax
        jmp report_read

# eax = the value read: "r IDX VALUE[ ok| BAD EXPECTED]"
report_read:
        movl %eax, %ebx
        movb $'r', %al
        call putc
        call put_index
        movl %ebx, %eax
        call put_hex
        testl $1, 16(%ebp)
        jz endline
        cmpl 12(%ebp), %ebx
        jne 1f
        movl $msg_ok, %esi
        call puts
        jmp endline
1:      incl fails
        movl $msg_bad, %esi
        call puts
        movl 12(%ebp), %eax
        call put_hex
endline:
        movb $'\n', %al
        call putc
        jmp advance

do_outs:
        movl 8(%ebp), %edx
        movl 12(%ebp), %ecx
        movl 16(%ebp), %esi
        movl 4(%ebp), %eax
        cmpl $1, %eax
        jne 1f
        rep outsb
        jmp advance
1:      cmpl $2, %eax
        jne 2f
        rep outsw
        jmp advance
2:      rep outsl
        jmp advance

# "s IDX FIRST-DWORD[ ok| BAD]"
do_ins:
        movl 8(%ebp), %edx
        movl 12(%ebp), %ecx
        movl $insbuf, %edi
        movl 4(%ebp), %eax
        cmpl $1, %eax
        jne 1f
        rep insb
        jmp 3f
1:      cmpl $2, %eax
        jne 2f
        rep insw
        jmp 3f
2:      rep insl
3:      movb $'s', %al
        call putc
        call put_index
        movl insbuf, %eax
        call put_hex
        movl 16(%ebp), %esi
        testl %esi, %esi
        jz endline
        movl $insbuf, %edi
        movl 12(%ebp), %ecx
        imull 4(%ebp), %ecx
        repe cmpsb
        jne 4f
        movl $msg_ok, %esi
        call puts
        jmp endline
4:      incl fails
        movl $msg_bad, %esi
        call puts
        jmp endline

do_print:
        movl 16(%ebp), %esi
        call puts
        jmp endline

# The first time through, arm the counter for value - 1 more runs of the body; jump back
# while it lasts, then fall through and disarm.
do_loop:
        cmpl $0, loop_armed
        jne 1f
        movl 12(%ebp), %eax
        decl %eax
        movl %eax, loop_left
        movl $1, loop_armed
1:      cmpl $0, loop_left
        je 2f
        decl loop_left
        movl 8(%ebp), %eax
        movl %eax, index
        imull $RECORD, %eax
        addl $script, %eax
        movl %eax, %ebp
        jmp next
2:      movl $0, loop_armed
        jmp advance

done:
        movl $msg_done, %esi
        call puts
        movl fails, %eax
        call put_hex
        movb $'\n', %al
        call putc
        # SCHEDOP_shutdown(SHUTDOWN_poweroff) through the hypercall page: Xen filled it with
        # the right instruction for this CPU (vmmcall on AMD SVM, vmcall on Intel VMX).
        movl $SCHEDOP_shutdown, %ebx
        movl $shutdown_reason, %ecx
        call hypercall_page + HYPERVISOR_sched_op * 32
        movl $msg_noshutdown, %esi
        call puts
halt:
        hlt
        jmp halt

# Find Xen's CPUID leaves (0x40000000, or a multiple of 0x100 above when Xen also shows
# Viridian) and ask Xen to write its hypercall page: leaf base+2 gives the MSR to write
# the page's guest-physical address to.
hypercall_setup:
        movl $0x40000000, %esi
1:      movl %esi, %eax
        cpuid
        cmpl $0x566e6558, %ebx          # "XenV"
        jne 2f
        cmpl $0x65584d4d, %ecx          # "MMXe"
        jne 2f
        cmpl $0x4d4d566e, %edx          # "nVMM"
        je 3f
2:      addl $0x100, %esi
        cmpl $0x40010000, %esi
        jb 1b
        movl $msg_noxen, %esi
        call puts
        jmp halt
3:      leal 2(%esi), %eax
        cpuid
        movl %ebx, %ecx
        movl $hypercall_page, %eax
        xorl %edx, %edx
        wrmsr
        ret

# putc(al); puts(esi: NUL-terminated); put_hex(eax) as " XXXXXXXX"; put_index as " IDX"
putc:
        outb %al, $DEBUG_PORT
        ret
puts:
        pushl %eax
1:      lodsb
        testb %al, %al
        jz 2f
        outb %al, $DEBUG_PORT
        jmp 1b
2:      popl %eax
        ret
put_hex:
        pushl %ecx
        pushl %edx
        movl %eax, %edx
        movb $' ', %al
        outb %al, $DEBUG_PORT
        movl $8, %ecx
1:      roll $4, %edx
        movl %edx, %eax
        andl $15, %eax
        movb hexdigits(%eax), %al
        outb %al, $DEBUG_PORT
        loop 1b
        popl %edx
        popl %ecx
        ret
put_index:
        movl index, %eax
        jmp put_hex

        .section .rodata
hexdigits:      .ascii "0123456789abcdef"
msg_ok:         .asciz " ok"
msg_bad:        .asciz " BAD"
msg_done:       .asciz "xendmop-guest done"
msg_badop:      .asciz "xendmop-guest: unknown op\n"
msg_noxen:      .asciz "xendmop-guest: no Xen CPUID leaves\n"
msg_noshutdown: .asciz "xendmop-guest: SCHEDOP_shutdown returned\n"

        .data
        .balign 4
shutdown_reason: .long 0                # SHUTDOWN_poweroff
index:          .long 0
fails:          .long 0
loop_armed:     .long 0
loop_left:      .long 0

        .include "script.s"

        .bss
        .balign 4096
hypercall_page: .skip 4096
insbuf:         .skip 65536
stack:          .skip 16384
stack_top:
