"""The fake /dev/xen devices (fakexen.c), the shared call table and the C reference."""
