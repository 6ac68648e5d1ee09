/*
 * fakexen: a fake /dev/xen/{privcmd,hypercall,evtchn} below libc, for LD_PRELOAD.
 *
 * Opening one of those paths gives a real fd (of /dev/null, so that stat() and
 * Python's mmap size checks behave as for a character device) remembered as that
 * device.  ioctl() on such an fd is recorded, one JSON object per line, to the file
 * named by $FAKEXEN_LOG, and answered:
 *
 *   IOCTL_PRIVCMD_DM_OP       the request (dom, num) and every buffer's bytes;
 *                             then, as Xen would on success, a deterministic
 *                             pattern is written into the OUT parts (see fill()).
 *   IOCTL_PRIVCMD_HYPERCALL   op, arg[0..4], and for __HYPERVISOR_dm_op the
 *                             xen_dm_op_buf array behind arg[2]; same fill.
 *   IOCTL_PRIVCMD_RESTRICT    the domid.
 *   anything else             recorded, ENOTTY.
 *
 * Environment:
 *   FAKEXEN_LOG        log file (appended to); no log if unset
 *   FAKEXEN_NO_DM_OP   if set, DM_OP and RESTRICT fail with ENOTTY (a kernel
 *                      before Linux 4.11), so callers fall back to HYPERCALL
 *   FAKEXEN_ABSENT     if set, opening any /dev/xen device fails with ENOENT
 *
 * mmap() of a fake fd returns anonymous memory; everything else passes through
 * to the next definition (dlsym RTLD_NEXT).  The structures below are written
 * from Linux's include/uapi/xen/privcmd.h and Xen's public/hvm/dm_op.h layouts
 * (x86_64), so that no Xen or kernel header is needed to build this file.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

struct fx_hypercall { uint64_t op; uint64_t arg[5]; };          /* privcmd_hypercall */
struct fx_dm_op_buf { void *uptr; size_t size; };                /* privcmd_dm_op_buf */
struct fx_dm_op { uint16_t dom; uint16_t num; const struct fx_dm_op_buf *ubufs; };
struct fx_xen_buf { uint64_t h; uint64_t size; };                /* xen_dm_op_buf */

#define FX_IOC(nr, size) _IOC(_IOC_NONE, 'P', (nr), (size))
#define FX_HYPERCALL FX_IOC(0, sizeof(struct fx_hypercall))
#define FX_DM_OP FX_IOC(5, sizeof(struct fx_dm_op))
#define FX_RESTRICT FX_IOC(6, sizeof(uint16_t))
#define FX_HYPERVISOR_dm_op 41

enum fx_kind { FX_NONE, FX_PRIVCMD, FX_HYPERCALL_DEV, FX_EVTCHN };
static const char *const fx_names[] = { "", "privcmd", "hypercall", "evtchn" };
#define FX_MAX_FD 4096
static unsigned char fx_kind_of[FX_MAX_FD];

static int (*real_open)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_close)(int);
static int (*real_dup2)(int, int);
static int (*real_dup3)(int, int, int);
static int (*real_ioctl)(int, unsigned long, ...);
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static int fx_log = -1;

__attribute__((constructor)) static void fx_init(void)
{
    real_open = dlsym(RTLD_NEXT, "open");
    real_openat = dlsym(RTLD_NEXT, "openat");
    real_close = dlsym(RTLD_NEXT, "close");
    real_dup2 = dlsym(RTLD_NEXT, "dup2");
    real_dup3 = dlsym(RTLD_NEXT, "dup3");
    real_ioctl = dlsym(RTLD_NEXT, "ioctl");
    real_mmap = dlsym(RTLD_NEXT, "mmap");
    const char *log = getenv("FAKEXEN_LOG");
    if (log)
        fx_log = real_open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
}

/* --- the log: one line per event, written with a single write() ---------- */

struct fx_line { char *text; size_t len, room; };

static void fx_put(struct fx_line *l, const char *fmt, ...)
{
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int n = vsnprintf(l->text + l->len, l->room - l->len, fmt, ap);
        va_end(ap);
        if (n < 0)
            return;
        if (l->len + (size_t)n < l->room) {
            l->len += (size_t)n;
            return;
        }
        l->room = 2 * (l->room + (size_t)n);
        l->text = realloc(l->text, l->room);
        if (!l->text)
            abort();
    }
}

static void fx_hex(struct fx_line *l, const void *p, size_t n)
{
    const unsigned char *b = p;
    fx_put(l, "\"");
    for (size_t i = 0; i < n; i++)
        fx_put(l, "%02x", b[i]);
    fx_put(l, "\"");
}

static struct fx_line fx_begin(const char *event, int fd)
{
    struct fx_line l = { malloc(256), 0, 256 };
    if (!l.text)
        abort();
    fx_put(&l, "{\"event\": \"%s\", \"dev\": \"%s\"", event, fx_names[fx_kind_of[fd]]);
    return l;
}

static void fx_end(struct fx_line *l)
{
    fx_put(l, "}\n");
    if (fx_log >= 0 && write(fx_log, l->text, l->len) != (ssize_t)l->len)
        abort();
    free(l->text);
}

/* --- which fds are fake devices ------------------------------------------ */

static enum fx_kind fx_path_kind(const char *path)
{
    if (!path)
        return FX_NONE;
    if (!strcmp(path, "/dev/xen/privcmd"))
        return FX_PRIVCMD;
    if (!strcmp(path, "/dev/xen/hypercall"))
        return FX_HYPERCALL_DEV;
    if (!strcmp(path, "/dev/xen/evtchn"))
        return FX_EVTCHN;
    return FX_NONE;
}

static int fx_is_fake(int fd)
{
    return fd >= 0 && fd < FX_MAX_FD && fx_kind_of[fd] != FX_NONE;
}

static void fx_forget(int fd)
{
    if (fd >= 0 && fd < FX_MAX_FD)
        fx_kind_of[fd] = FX_NONE;
}

static int fx_open_fake(enum fx_kind kind, int flags)
{
    if (getenv("FAKEXEN_ABSENT")) {
        errno = ENOENT;
        return -1;
    }
    int fd = real_open("/dev/null", O_RDWR | (flags & O_CLOEXEC));
    if (fd < 0)
        return fd;
    if (fd >= FX_MAX_FD) {
        real_close(fd);
        errno = EMFILE;
        return -1;
    }
    fx_kind_of[fd] = kind;
    struct fx_line l = fx_begin("open", fd);
    fx_put(&l, ", \"accmode\": %d, \"cloexec\": %s", flags & O_ACCMODE, (flags & O_CLOEXEC) ? "true" : "false");
    fx_end(&l);
    return fd;
}

static mode_t fx_mode(int flags, va_list ap)
{
    return (flags & (O_CREAT | O_TMPFILE)) ? va_arg(ap, mode_t) : 0;
}

int open(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = fx_mode(flags, ap);
    va_end(ap);
    enum fx_kind kind = fx_path_kind(path);
    return kind ? fx_open_fake(kind, flags) : real_open(path, flags, mode);
}

int open64(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = fx_mode(flags, ap);
    va_end(ap);
    return open(path, flags, mode);
}

int __open_2(const char *path, int flags) { return open(path, flags); }
int __open64_2(const char *path, int flags) { return open(path, flags); }

int openat(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = fx_mode(flags, ap);
    va_end(ap);
    enum fx_kind kind = fx_path_kind(path);
    return kind ? fx_open_fake(kind, flags) : real_openat(dirfd, path, flags, mode);
}

int openat64(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = fx_mode(flags, ap);
    va_end(ap);
    return openat(dirfd, path, flags, mode);
}

int close(int fd)
{
    fx_forget(fd);
    return real_close(fd);
}

int dup2(int oldfd, int newfd)
{
    fx_forget(newfd);
    return real_dup2(oldfd, newfd);
}

int dup3(int oldfd, int newfd, int flags)
{
    fx_forget(newfd);
    return real_dup3(oldfd, newfd, flags);
}

void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
    if (!fx_is_fake(fd))
        return real_mmap(addr, length, prot, flags, fd, offset);
    struct fx_line l = fx_begin("mmap", fd);
    fx_put(&l, ", \"length\": %zu, \"prot\": %d, \"shared\": %s, \"offset\": %lld", length, prot,
           (flags & MAP_SHARED) ? "true" : "false", (long long)offset);
    fx_end(&l);
    int anon = (flags & ~(MAP_SHARED | MAP_PRIVATE)) | MAP_PRIVATE | MAP_ANONYMOUS;
    return real_mmap(addr, length, prot, anon, -1, 0);
}

void *mmap64(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
    return mmap(addr, length, prot, flags, fd, offset);
}

/* --- the answers ----------------------------------------------------------- */

/* Ops whose struct Xen copies back on success (const_op false). */
static int fx_copies_back(uint32_t op)
{
    switch (op) {
    case 1:  /* create_ioreq_server */
    case 2:  /* get_ioreq_server_info */
    case 12: /* set_mem_type */
    case 15: /* map_mem_type_to_ioreq_server */
    case 20: /* nr_vcpus */
        return 1;
    default:
        return 0;
    }
}

/*
 * Write what Xen would leave behind, deterministically: a pattern seeded from the
 * request's bytes over op.u (bufs[0] from offset 8) for ops that copy back, and
 * over bufs[1] for track_dirty_vram (op 7).  Equal requests get equal answers.
 */
static void fx_fill(unsigned nr, void *const ptrs[], const size_t sizes[])
{
    if (nr == 0 || sizes[0] < 8)
        return;
    unsigned char *op = ptrs[0];
    uint32_t number;
    memcpy(&number, op, sizeof(number));
    unsigned seed = 0;
    for (size_t i = 0; i < sizes[0]; i++)
        seed = seed * 31 + op[i];
    if (number == 7 && nr >= 2) {
        unsigned char *bitmap = ptrs[1];
        for (size_t i = 0; i < sizes[1]; i++)
            bitmap[i] = (unsigned char)(seed + i * 0x1d + (i >> 8));
    }
    if (fx_copies_back(number))
        for (size_t i = 8; i < sizes[0]; i++)
            op[i] = (unsigned char)(seed >> (i & 7)) ^ (unsigned char)(0xa5 + i);
}

static void fx_bufs(struct fx_line *l, unsigned nr, void *const ptrs[], const size_t sizes[])
{
    fx_put(l, ", \"bufs\": [");
    for (unsigned i = 0; i < nr; i++) {
        fx_put(l, "%s{\"size\": %zu, \"bytes\": ", i ? ", " : "", sizes[i]);
        fx_hex(l, ptrs[i], sizes[i]);
        fx_put(l, "}");
    }
    fx_put(l, "]");
}

static int fx_dm_op(int fd, struct fx_dm_op *req)
{
    unsigned nr = req->num;
    void *ptrs[nr ? nr : 1];
    size_t sizes[nr ? nr : 1];
    for (unsigned i = 0; i < nr; i++) {
        ptrs[i] = req->ubufs[i].uptr;
        sizes[i] = req->ubufs[i].size;
    }
    struct fx_line l = fx_begin("dm_op", fd);
    fx_put(&l, ", \"dom\": %u, \"num\": %u", req->dom, nr);
    fx_bufs(&l, nr, ptrs, sizes);
    int refused = getenv("FAKEXEN_NO_DM_OP") != NULL;
    fx_put(&l, ", \"answer\": %d", refused ? -ENOTTY : 0);
    fx_end(&l);
    if (refused) {
        errno = ENOTTY;
        return -1;
    }
    fx_fill(nr, ptrs, sizes);
    return 0;
}

static int fx_hypercall(int fd, struct fx_hypercall *call)
{
    struct fx_line l = fx_begin("hypercall", fd);
    fx_put(&l, ", \"op\": %llu, \"arg\": [%llu, %llu, null, %llu, %llu]", (unsigned long long)call->op,
           (unsigned long long)call->arg[0], (unsigned long long)call->arg[1],
           (unsigned long long)call->arg[3], (unsigned long long)call->arg[4]);
    if (call->op != FX_HYPERVISOR_dm_op) {
        fx_end(&l);
        errno = ENOSYS;
        return -1;
    }
    unsigned nr = (unsigned)call->arg[1];
    const struct fx_xen_buf *xbufs = (const void *)(uintptr_t)call->arg[2];
    void *ptrs[nr ? nr : 1];
    size_t sizes[nr ? nr : 1];
    for (unsigned i = 0; i < nr; i++) {
        ptrs[i] = (void *)(uintptr_t)xbufs[i].h;
        sizes[i] = (size_t)xbufs[i].size;
    }
    fx_put(&l, ", \"dom\": %llu, \"num\": %u", (unsigned long long)call->arg[0], nr);
    fx_bufs(&l, nr, ptrs, sizes);
    fx_end(&l);
    fx_fill(nr, ptrs, sizes);
    return 0;
}

int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (!fx_is_fake(fd))
        return real_ioctl(fd, request, arg);
    if (fx_kind_of[fd] == FX_PRIVCMD && request == FX_DM_OP)
        return fx_dm_op(fd, arg);
    if (fx_kind_of[fd] == FX_PRIVCMD && request == FX_HYPERCALL)
        return fx_hypercall(fd, arg);
    if (fx_kind_of[fd] == FX_PRIVCMD && request == FX_RESTRICT) {
        uint16_t domid;
        memcpy(&domid, arg, sizeof(domid));
        struct fx_line l = fx_begin("restrict", fd);
        fx_put(&l, ", \"dom\": %u", domid);
        fx_end(&l);
        if (getenv("FAKEXEN_NO_DM_OP")) {
            errno = ENOTTY;
            return -1;
        }
        return 0;
    }
    struct fx_line l = fx_begin("ioctl", fd);
    fx_put(&l, ", \"request\": %lu", request);
    fx_end(&l);
    errno = ENOTTY;
    return -1;
}
