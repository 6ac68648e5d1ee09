/* guestio: the HVM test guest's hands.  Port and physical-memory accesses of exact sizes
 * from its busybox shell, which has no applet for them (devmem has no fill or checksum,
 * /dev/port only does bytes).  Built statically in dom0 at test time, run as root in the
 * guest.  Every number is parsed with strtoull(..., 0): decimal or 0x-prefixed hex.
 *
 *   guestio inb|inw|inl PORT              print the value read, in hex
 *   guestio outb|outw|outl PORT VALUE
 *   guestio inbench PORT N                N byte reads of PORT; print "N ns" (the total)
 *   guestio memfill PHYS LEN SEED         LEN bytes of pattern(SEED) at PHYS (via /dev/mem)
 *   guestio memsum PHYS LEN               print FNV-1a 32 of LEN bytes at PHYS, in hex
 *   guestio cfgr BDF OFFSET               print a 32-bit config-space read of 0000:BDF, in hex
 *   guestio cfgw BDF OFFSET VALUE         a 32-bit config-space write (through sysfs, as setpci)
 *   guestio txbench N                     write N bytes of text to stdout in 64-byte
 *                                         writes, wait until a tty sent them (tcdrain),
 *                                         then print "N ns" on a line of its own
 *   guestio udpsend IPV4 PORT N SIZE      send N bytes to IPV4:PORT as SIZE-byte UDP datagrams
 *                                         (the last shorter) as fast as the socket takes
 *                                         them (blocking: the NIC's transmit ring and the
 *                                         socket's send buffer pace it), then print
 *                                         "DATAGRAMS BYTES ns" (what send() accepted)
 *
 * pattern(SEED): the xorshift32 stream seeded with SEED (0 is taken as 1), one 32-bit
 * little-endian word per 4 bytes; the tests compute the same words on the host.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
    fprintf(stderr, "guestio: %s: %s\n", what, strerror(errno));
    exit(1);
}

static unsigned long long num(const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end || end == s) {
        fprintf(stderr, "guestio: not a number: '%s'\n", s);
        exit(2);
    }
    return v;
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Map [phys, phys+len) of /dev/mem; *base is what to munmap. */
static volatile uint8_t *map_phys(uint64_t phys, size_t len, void **base, size_t *maplen)
{
    int fd = open("/dev/mem", O_RDWR | O_SYNC);
    if (fd < 0)
        die("/dev/mem");
    uint64_t page = phys & ~(uint64_t)4095;
    *maplen = (size_t)(phys - page) + len;
    *base = mmap(NULL, *maplen, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)page);
    if (*base == MAP_FAILED)
        die("mmap /dev/mem");
    close(fd);
    return (volatile uint8_t *)*base + (phys - page);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: guestio in[bwl]|out[bwl]|inbench|memfill|memsum|cfgr|cfgw|txbench|udpsend ...\n");
        return 2;
    }
    const char *cmd = argv[1];
    if (cmd[0] == 'i' && cmd[1] == 'n' && cmd[3] == 0) {
        unsigned port = (unsigned)num(argv[2]);
        if (iopl(3))
            die("iopl");
        unsigned v = cmd[2] == 'b' ? inb(port) : cmd[2] == 'w' ? inw(port) : inl(port);
        printf("%#x\n", v);
    } else if (!strncmp(cmd, "out", 3) && cmd[4] == 0 && argc == 4) {
        unsigned port = (unsigned)num(argv[2]);
        unsigned long long v = num(argv[3]);
        if (iopl(3))
            die("iopl");
        if (cmd[3] == 'b')
            outb((uint8_t)v, port);
        else if (cmd[3] == 'w')
            outw((uint16_t)v, port);
        else
            outl((uint32_t)v, port);
    } else if (!strcmp(cmd, "inbench") && argc == 4) {
        unsigned port = (unsigned)num(argv[2]);
        unsigned long long n = num(argv[3]);
        if (iopl(3))
            die("iopl");
        long long t0 = now_ns();
        for (unsigned long long i = 0; i < n; i++)
            (void)inb(port);
        printf("%llu %lld\n", n, now_ns() - t0);
    } else if (!strcmp(cmd, "memfill") && argc == 5) {
        uint64_t phys = num(argv[2]);
        size_t len = (size_t)num(argv[3]);
        uint32_t x = (uint32_t)num(argv[4]) ? (uint32_t)num(argv[4]) : 1;
        void *base;
        size_t maplen;
        volatile uint8_t *p = map_phys(phys, len, &base, &maplen);
        for (size_t i = 0; i < len; i += 4) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            for (size_t k = 0; k < 4 && i + k < len; k++)
                p[i + k] = (uint8_t)(x >> (8 * k));
        }
        munmap(base, maplen);
    } else if (!strcmp(cmd, "memsum") && argc == 4) {
        uint64_t phys = num(argv[2]);
        size_t len = (size_t)num(argv[3]);
        void *base;
        size_t maplen;
        volatile uint8_t *p = map_phys(phys, len, &base, &maplen);
        uint32_t h = 2166136261u;
        for (size_t i = 0; i < len; i++)
            h = (h ^ p[i]) * 16777619u;
        munmap(base, maplen);
        printf("%#x\n", h);
    } else if ((!strcmp(cmd, "cfgr") && argc == 4) || (!strcmp(cmd, "cfgw") && argc == 5)) {
        char path[128];
        snprintf(path, sizeof(path), "/sys/bus/pci/devices/0000:%s/config", argv[2]);
        off_t off = (off_t)num(argv[3]);
        int fd = open(path, cmd[3] == 'w' ? O_RDWR : O_RDONLY);
        if (fd < 0)
            die(path);
        uint32_t v;
        if (cmd[3] == 'w') {
            v = (uint32_t)num(argv[4]);
            if (pwrite(fd, &v, 4, off) != 4)
                die("config write");
        } else {
            if (pread(fd, &v, 4, off) != 4)
                die("config read");
            printf("%#x\n", v);
        }
        close(fd);
    } else if (!strcmp(cmd, "txbench")) {
        unsigned long long n = num(argv[2]);
        char line[64];
        for (int i = 0; i < 63; i++)
            line[i] = (char)('a' + i % 26);
        line[63] = '\n';
        long long t0 = now_ns();
        for (unsigned long long done = 0; done < n;) {
            size_t k = n - done < 64 ? (size_t)(n - done) : 64;
            ssize_t w = write(1, line, k);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                die("write");
            }
            done += (unsigned long long)w;
        }
        tcdrain(1); /* on a tty: until the UART took the last byte, not just the tty buffer */
        printf("\n%llu %lld\n", n, now_ns() - t0);
    } else if (!strcmp(cmd, "udpsend") && argc == 6) {
        struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)num(argv[3]))};
        unsigned long long n = num(argv[4]), size = num(argv[5]);
        static char buf[65507];
        if (inet_pton(AF_INET, argv[2], &to.sin_addr) != 1 || size == 0 || size > sizeof(buf)) {
            fprintf(stderr, "guestio: udpsend IPV4 PORT N SIZE (SIZE 1..%zu)\n", sizeof(buf));
            return 2;
        }
        memset(buf, 'u', sizeof(buf));
        int fd = socket(AF_INET, SOCK_DGRAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&to, sizeof(to)))
            die("udp socket");
        unsigned long long datagrams = 0, done = 0;
        long long t0 = now_ns();
        while (done < n) {
            size_t k = n - done < size ? (size_t)(n - done) : (size_t)size;
            ssize_t w = send(fd, buf, k, 0);
            if (w < 0) {
                if (errno == EINTR || errno == ENOBUFS)
                    continue; /* ENOBUFS: the qdisc was full; the datagram was not taken */
                die("send");
            }
            datagrams++;
            done += (unsigned long long)w;
        }
        printf("%llu %llu %lld\n", datagrams, done, now_ns() - t0);
        close(fd);
    } else {
        fprintf(stderr, "guestio: unknown command or arguments: %s\n", cmd);
        return 2;
    }
    return 0;
}
