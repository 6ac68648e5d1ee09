/*
 * Upstream declarations newer than Debian 12's headers (linux-libc-dev 6.1),
 * restated so gcc can lay them out.  Used only to check the names the registry
 * lists in PROVENANCE; the installed headers are never mixed with this file.
 * Include after <linux/types.h>, <linux/ioctl.h> and <xen/xen.h>.
 */
#ifndef XENDMOP_TEST_NEWER_UAPI_H
#define XENDMOP_TEST_NEWER_UAPI_H

/* Linux 6.7, include/uapi/xen/privcmd.h */
#define PRIVCMD_IRQFD_FLAG_DEASSIGN (1 << 0)
struct privcmd_irqfd {
	__u64 dm_op;
	__u32 size;
	__u32 fd;
	__u32 flags;
	domid_t dom;
	__u8 pad[2];
};

#define PRIVCMD_IOEVENTFD_FLAG_DEASSIGN (1 << 0)
struct privcmd_ioeventfd {
	__u64 ioreq;
	__u64 ports;
	__u64 addr;
	__u32 addr_len;
	__u32 event_fd;
	__u32 vcpus;
	__u32 vq;
	__u32 flags;
	domid_t dom;
	__u8 pad[2];
};

#define IOCTL_PRIVCMD_IRQFD _IOW('P', 8, struct privcmd_irqfd)
#define IOCTL_PRIVCMD_IOEVENTFD _IOW('P', 9, struct privcmd_ioeventfd)

/* Linux 6.12, include/uapi/xen/privcmd.h */
struct privcmd_pcidev_get_gsi {
	__u32 sbdf;
	__u32 gsi;
};
#define IOCTL_PRIVCMD_PCIDEV_GET_GSI \
	_IOC(_IOC_NONE, 'P', 10, sizeof(struct privcmd_pcidev_get_gsi))

/* Linux 6.2, include/uapi/xen/evtchn.h: the struct's tag is ioctl_evtchn_bind. */
struct ioctl_evtchn_bind {
	unsigned int port;
};
#define IOCTL_EVTCHN_BIND_STATIC \
	_IOC(_IOC_NONE, 'E', 7, sizeof(struct ioctl_evtchn_bind))

/* Xen, tools/include/xen-sys/Linux/privcmd.h: a number no driver implements. */
#define IOCTL_PRIVCMD_UNIMPLEMENTED _IOC(_IOC_NONE, 'P', 0xFF, 0)

#endif
