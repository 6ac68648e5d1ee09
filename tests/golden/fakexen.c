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
 *   IOCTL_PRIVCMD_MMAP_RESOURCE  dom, type, id, idx, num; the pages at addr get,
 *                             in each 32-byte ioreq slot s of page p, vp_eport
 *                             (offset 24) = 0x100 * (idx + p + 1) + s.
 *   IOCTL_PRIVCMD_MMAPBATCH_V2   dom and the gfns; page i is filled with gfn i
 *                             (as uint64s); a gfn >= 2^40 gets err[i] = -EINVAL.
 *   evtchn BIND_INTERDOMAIN   returns local port 0x1000 + remote_port;
 *          BIND_UNBOUND_PORT  returns 0x2000 + remote_domain;
 *          UNBIND, RESET, RESTRICT_DOMID  recorded, 0;
 *          NOTIFY             recorded, and the port becomes pending, as if the
 *                             other end answered at once: read() returns it
 *                             (EAGAIN when nothing is pending), write() logs
 *                             the ports written back ("unmask").
 *   anything else             recorded, ENOTTY.
 *
 * Environment:
 *   FAKEXEN_LOG        log file (appended to); no log if unset
 *   FAKEXEN_NO_DM_OP   if set, DM_OP and RESTRICT fail with ENOTTY (a kernel
 *                      before Linux 4.11), so callers fall back to HYPERCALL
 *   FAKEXEN_ABSENT     if set, opening any /dev/xen device fails with ENOENT
 *   FAKEXEN_NO_RESOURCE  if set, MMAP_RESOURCE fails with ENOTTY (a kernel
 *                      without resource mapping)
 *   FAKEXEN_EVTCHN_ERRNO  if set to n, every evtchn ioctl fails with errno n
 *
 * mmap() of a fake fd returns anonymous memory (munmap of it is recorded);
 * everything else passes through
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
#define FX_MMAPBATCH_V2 FX_IOC(4, 32)
#define FX_MMAP_RESOURCE FX_IOC(7, 32)
#define FX_HYPERVISOR_dm_op 41
#define FX_EVTCHN_IOC(nr, size) _IOC(_IOC_NONE, 'E', (nr), (size))
#define FX_EVTCHN_BIND_INTERDOMAIN FX_EVTCHN_IOC(1, 8)
#define FX_EVTCHN_BIND_UNBOUND_PORT FX_EVTCHN_IOC(2, 4)
#define FX_EVTCHN_UNBIND FX_EVTCHN_IOC(3, 4)
#define FX_EVTCHN_NOTIFY FX_EVTCHN_IOC(4, 4)
#define FX_EVTCHN_RESET FX_EVTCHN_IOC(5, 0)
#define FX_EVTCHN_RESTRICT_DOMID FX_EVTCHN_IOC(6, 2)

struct fx_mmap_resource { uint16_t dom; uint32_t type; uint32_t id; uint32_t idx; uint64_t num; uint64_t addr; };
struct fx_mmapbatch_v2 { uint32_t num; uint16_t dom; uint64_t addr; const uint64_t *arr; int *err; };

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
static int (*real_munmap)(void *, size_t);
static ssize_t (*real_read)(int, void *, size_t);
static ssize_t (*real_write)(int, const void *, size_t);
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
    real_munmap = dlsym(RTLD_NEXT, "munmap");
    real_read = dlsym(RTLD_NEXT, "read");
    real_write = dlsym(RTLD_NEXT, "write");
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
    fx_put(&l, "{\"event\": \"%s\", \"dev\": \"%s\"", event, fd >= 0 ? fx_names[fx_kind_of[fd]] : "");
    return l;
}

/* --- mappings of fake fds, so that their munmap can be recorded ------------ */

#define FX_MAX_MAPS 256
static struct { void *addr; size_t length; enum fx_kind kind; } fx_maps[FX_MAX_MAPS];

static void fx_remember_map(void *addr, size_t length, enum fx_kind kind)
{
    for (int i = 0; i < FX_MAX_MAPS; i++)
        if (!fx_maps[i].addr) {
            fx_maps[i].addr = addr;
            fx_maps[i].length = length;
            fx_maps[i].kind = kind;
            return;
        }
}

static enum fx_kind fx_forget_map(void *addr, size_t length)
{
    for (int i = 0; i < FX_MAX_MAPS; i++)
        if (fx_maps[i].addr == addr && fx_maps[i].length == length) {
            fx_maps[i].addr = NULL;
            return fx_maps[i].kind;
        }
    return FX_NONE;
}

static void fx_end(struct fx_line *l)
{
    fx_put(l, "}\n");
    if (fx_log >= 0 && real_write(fx_log, l->text, l->len) != (ssize_t)l->len)
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
    void *p = real_mmap(addr, length, prot, anon, -1, 0);
    if (p != MAP_FAILED)
        fx_remember_map(p, length, fx_kind_of[fd]);
    return p;
}

int munmap(void *addr, size_t length)
{
    enum fx_kind kind = fx_forget_map(addr, length);
    if (kind != FX_NONE) {
        struct fx_line l = fx_begin("munmap", -1);
        fx_put(&l, ", \"mapped_from\": \"%s\", \"length\": %zu", fx_names[kind], length);
        fx_end(&l);
    }
    return real_munmap(addr, length);
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

/* --- foreign mappings ------------------------------------------------------ */

static int fx_mmap_resource(int fd, struct fx_mmap_resource *r)
{
    struct fx_line l = fx_begin("mmap_resource", fd);
    fx_put(&l, ", \"dom\": %u, \"type\": %u, \"id\": %u, \"idx\": %u, \"num\": %llu, \"addr\": %s", r->dom,
           r->type, r->id, r->idx, (unsigned long long)r->num, r->addr ? "true" : "false");
    fx_end(&l);
    if (getenv("FAKEXEN_NO_RESOURCE")) {
        errno = ENOTTY;
        return -1;
    }
    if (!r->addr) {
        if (r->num) {
            errno = EINVAL;
            return -1;
        }
        r->num = 2; /* size query: an ioreq server has two frames */
        return 0;
    }
    for (uint64_t p = 0; p < r->num; p++) {
        unsigned char *page = (unsigned char *)(uintptr_t)r->addr + p * 4096;
        memset(page, 0, 4096);
        for (uint32_t slot = 0; slot < 4096 / 32; slot++) {
            uint32_t port = 0x100 * (uint32_t)(r->idx + p + 1) + slot;
            memcpy(page + slot * 32 + 24, &port, sizeof(port));
        }
    }
    return 0;
}

static int fx_mmapbatch(int fd, struct fx_mmapbatch_v2 *b)
{
    struct fx_line l = fx_begin("mmapbatch_v2", fd);
    fx_put(&l, ", \"dom\": %u, \"num\": %u, \"gfns\": [", b->dom, b->num);
    for (uint32_t i = 0; i < b->num; i++)
        fx_put(&l, "%s%llu", i ? ", " : "", (unsigned long long)b->arr[i]);
    fx_put(&l, "]");
    fx_end(&l);
    for (uint32_t i = 0; i < b->num; i++) {
        uint64_t *page = (uint64_t *)(uintptr_t)(b->addr + (uint64_t)i * 4096);
        int bad = b->arr[i] >= (1ULL << 40);
        b->err[i] = bad ? -EINVAL : 0;
        for (int w = 0; w < 4096 / 8; w++)
            page[w] = bad ? 0 : b->arr[i];
    }
    return 0;
}

/* --- event channels: the pending ring ------------------------------------- */

#define FX_RING 64
static uint32_t fx_pending[FX_RING];
static unsigned fx_pending_head, fx_pending_tail;

static int fx_evtchn(int fd, unsigned long request, void *arg)
{
    uint32_t word[2] = { 0, 0 };
    const char *name;
    switch (request) {
    case FX_EVTCHN_BIND_INTERDOMAIN: name = "bind_interdomain"; memcpy(word, arg, 8); break;
    case FX_EVTCHN_BIND_UNBOUND_PORT: name = "bind_unbound_port"; memcpy(word, arg, 4); break;
    case FX_EVTCHN_UNBIND: name = "unbind"; memcpy(word, arg, 4); break;
    case FX_EVTCHN_NOTIFY: name = "notify"; memcpy(word, arg, 4); break;
    case FX_EVTCHN_RESET: name = "reset"; break;
    case FX_EVTCHN_RESTRICT_DOMID: { uint16_t d; memcpy(&d, arg, 2); word[0] = d; name = "restrict_domid"; break; }
    default: name = NULL;
    }
    struct fx_line l = fx_begin(name ? "evtchn" : "ioctl", fd);
    if (!name) {
        fx_put(&l, ", \"request\": %lu", request);
        fx_end(&l);
        errno = ENOTTY;
        return -1;
    }
    const char *fail = getenv("FAKEXEN_EVTCHN_ERRNO");
    fx_put(&l, ", \"op\": \"%s\", \"arg\": [%u, %u]", name, word[0], word[1]);
    fx_end(&l);
    if (fail) {
        errno = atoi(fail);
        return -1;
    }
    switch (request) {
    case FX_EVTCHN_BIND_INTERDOMAIN: return (int)(0x1000 + word[1]);
    case FX_EVTCHN_BIND_UNBOUND_PORT: return (int)(0x2000 + word[0]);
    case FX_EVTCHN_NOTIFY:
        if (fx_pending_tail - fx_pending_head < FX_RING)
            fx_pending[fx_pending_tail++ % FX_RING] = word[0];
        return 0;
    case FX_EVTCHN_RESET: fx_pending_head = fx_pending_tail; return 0;
    default: return 0;
    }
}

ssize_t read(int fd, void *buf, size_t count)
{
    if (!fx_is_fake(fd) || fx_kind_of[fd] != FX_EVTCHN)
        return real_read(fd, buf, count);
    size_t n = 0;
    while (n + 4 <= count && fx_pending_head != fx_pending_tail) {
        memcpy((char *)buf + n, &fx_pending[fx_pending_head++ % FX_RING], 4);
        n += 4;
    }
    if (n == 0) {
        errno = EAGAIN;
        return -1;
    }
    return (ssize_t)n;
}

ssize_t write(int fd, const void *buf, size_t count)
{
    if (!fx_is_fake(fd) || fx_kind_of[fd] != FX_EVTCHN)
        return real_write(fd, buf, count);
    struct fx_line l = fx_begin("unmask", fd);
    fx_put(&l, ", \"ports\": [");
    for (size_t i = 0; i + 4 <= count; i += 4) {
        uint32_t port;
        memcpy(&port, (const char *)buf + i, 4);
        fx_put(&l, "%s%u", i ? ", " : "", port);
    }
    fx_put(&l, "]");
    fx_end(&l);
    return (ssize_t)count;
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
    if (fx_kind_of[fd] == FX_PRIVCMD && request == FX_MMAP_RESOURCE)
        return fx_mmap_resource(fd, arg);
    if (fx_kind_of[fd] == FX_PRIVCMD && request == FX_MMAPBATCH_V2)
        return fx_mmapbatch(fd, arg);
    if (fx_kind_of[fd] == FX_EVTCHN)
        return fx_evtchn(fd, request, arg);
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
