/*
 * Shim for Linux's <xen/privcmd.h>, which includes the kernel-internal
 * <xen/interface/xen.h> for domid_t and xen_pfn_t.  That file is not installed
 * in user space; the kernel's copy is Xen's public xen.h, which libxen-dev
 * installs as <xen/xen.h>, so forward to it (as Xen's own tools do: they
 * provide domid_t/xen_pfn_t from the public headers before privcmd.h).
 */
#include <xen/xen.h>
