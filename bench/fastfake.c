/*
 * A no-logging fake of /dev/xen/{privcmd,hypercall,evtchn} for the benchmarks,
 * after tests/golden/fakexen.c (same fd trick, same struct layouts) with the
 * JSON log removed, so that the device itself costs next to nothing: a DM_OP
 * ioctl reads the request's buffer list (touching every buffer's first byte,
 * as copy_from_user would start to) and succeeds.  Anything else on a fake fd:
 * ENOTTY.  mmap() of a fake fd returns anonymous memory.
 *
 * FASTFAKE_SYSCALL (set at load): each DM_OP also makes one real ioctl() on the
 * underlying /dev/null fd (ENOTTY, ignored), to add the kernel entry/exit that a
 * real privcmd ioctl costs before Xen is even reached.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

struct fx_dm_op_buf { void *uptr; size_t size; };
struct fx_dm_op { uint16_t dom; uint16_t num; const struct fx_dm_op_buf *ubufs; };
#define FX_DM_OP _IOC(_IOC_NONE, 'P', 5, sizeof(struct fx_dm_op))
#define FX_RESTRICT _IOC(_IOC_NONE, 'P', 6, sizeof(uint16_t))
#define FX_MAX_FD 4096
static unsigned char fx_fake[FX_MAX_FD];
volatile unsigned long fx_sink;
static int fx_syscall;

static int (*real_open)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_close)(int);
static int (*real_ioctl)(int, unsigned long, ...);
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);

__attribute__((constructor)) static void fx_init(void)
{
    real_open = dlsym(RTLD_NEXT, "open");
    real_openat = dlsym(RTLD_NEXT, "openat");
    real_close = dlsym(RTLD_NEXT, "close");
    real_ioctl = dlsym(RTLD_NEXT, "ioctl");
    real_mmap = dlsym(RTLD_NEXT, "mmap");
    fx_syscall = getenv("FASTFAKE_SYSCALL") != NULL;
}

static int fx_is_dev(const char *p)
{
    return p && (!strcmp(p, "/dev/xen/privcmd") || !strcmp(p, "/dev/xen/hypercall") || !strcmp(p, "/dev/xen/evtchn"));
}

static int fx_open(int flags)
{
    int fd = real_open("/dev/null", O_RDWR | (flags & O_CLOEXEC));
    if (fd >= 0 && fd < FX_MAX_FD)
        fx_fake[fd] = 1;
    return fd;
}

static mode_t fx_mode(int flags, va_list ap) { return (flags & (O_CREAT | O_TMPFILE)) ? va_arg(ap, mode_t) : 0; }

int open(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = fx_mode(flags, ap);
    va_end(ap);
    return fx_is_dev(path) ? fx_open(flags) : real_open(path, flags, mode);
}
int open64(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = fx_mode(flags, ap);
    va_end(ap);
    return open(path, flags, mode);
}
int openat(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = fx_mode(flags, ap);
    va_end(ap);
    return fx_is_dev(path) ? fx_open(flags) : real_openat(dirfd, path, flags, mode);
}
int openat64(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = fx_mode(flags, ap);
    va_end(ap);
    return openat(dirfd, path, flags, mode);
}
int __open_2(const char *path, int flags) { return open(path, flags); }
int __open64_2(const char *path, int flags) { return open(path, flags); }

int close(int fd)
{
    if (fd >= 0 && fd < FX_MAX_FD)
        fx_fake[fd] = 0;
    return real_close(fd);
}

void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
    if (fd < 0 || fd >= FX_MAX_FD || !fx_fake[fd])
        return real_mmap(addr, length, prot, flags, fd, offset);
    int anon = (flags & ~(MAP_SHARED | MAP_PRIVATE)) | MAP_PRIVATE | MAP_ANONYMOUS;
    return real_mmap(addr, length, prot, anon, -1, 0);
}
void *mmap64(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
    return mmap(addr, length, prot, flags, fd, offset);
}

int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (fd < 0 || fd >= FX_MAX_FD || !fx_fake[fd])
        return real_ioctl(fd, request, arg);
    if (request == FX_DM_OP) {
        const struct fx_dm_op *req = arg;
        unsigned long sum = 0;
        for (unsigned i = 0; i < req->num; i++)
            if (req->ubufs[i].size)
                sum += *(const unsigned char *)req->ubufs[i].uptr;
        fx_sink = sum;
        if (fx_syscall)
            real_ioctl(fd, request, arg);
        return 0;
    }
    if (request == FX_RESTRICT)
        return 0;
    errno = ENOTTY;
    return -1;
}
