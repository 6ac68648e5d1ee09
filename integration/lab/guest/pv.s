# A PV guest kernel that never runs: integration tests create it paused (`xl create -p`)
# only to have a PV domain to aim DMOPs at (x86 Xen refuses them for PV with EINVAL), and
# destroy it.  Xen's ELF loader needs these notes (public/elfnote.h) to build a 64-bit PV
# domain: guest OS, Xen version, loader, virtual base, physical offset, entry, hypercall
# page.  Assembled with `as --64`, linked with `ld -m elf_x86_64 -T pv.ld`.

        .section .note.Xen, "a", @note
        .balign 4
        .long 4, 8, 6                   # XEN_ELFNOTE_GUEST_OS
        .asciz "Xen"
        .asciz "xendmop"
        .balign 4
        .long 4, 8, 5                   # XEN_ELFNOTE_XEN_VERSION
        .asciz "Xen"
        .asciz "xen-3.0"
        .balign 4
        .long 4, 8, 8                   # XEN_ELFNOTE_LOADER
        .asciz "Xen"
        .asciz "generic"
        .balign 4
        .long 4, 8, 3                   # XEN_ELFNOTE_VIRT_BASE
        .asciz "Xen"
        .quad 0
        .long 4, 8, 4                   # XEN_ELFNOTE_PADDR_OFFSET
        .asciz "Xen"
        .quad 0
        .long 4, 8, 1                   # XEN_ELFNOTE_ENTRY
        .asciz "Xen"
        .quad start
        .long 4, 8, 2                   # XEN_ELFNOTE_HYPERCALL_PAGE
        .asciz "Xen"
        .quad hypercall_page

        .text
        .globl start
start:
        jmp start                       # never unpaused

        .balign 4096
hypercall_page:
        .skip 4096
