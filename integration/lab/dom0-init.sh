#!/bin/sh
# dom0's init for one lab run.  The image's stub init (PID 1) mounted the runner's writable
# share on /lab and exec'd this copy of the script, so this runs as PID 1: no systemd, which
# saves most of the boot.  It starts Xen's toolstack, runs /lab/command once with the checkout
# (shared read-only on /repo) as cwd and PYTHONPATH, records what happened on /lab and powers
# off; the runner on the host reads the results and the serial console.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb

say() { echo "xendmop-lab: $*" > /dev/console; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
# Wait for the power-off with no exec: a program loaded after the trigger can fail to read
# from the stopping disk, and PID 1 exiting on that panics the kernel (a false "crash").
poweroff_now() { sync; echo o > /proc/sysrq-trigger; read -r _ < /run/poweroff-wait; }

mkdir -p /dev/pts /dev/shm /run /tmp /repo
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mkfifo /run/poweroff-wait  # never written: opening it blocks until the power goes
mount -t tmpfs tmpfs /tmp
echo "boot_done $(uptime_s)" > /lab/timings
if ! mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144,cache=none repo /repo; then
    say "cannot mount the checkout share"; poweroff_now
fi
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs; do modprobe "$m"; done
# Mounts xenfs, starts xenstored, xen-init-dom0 and xenconsoled.
/etc/init.d/xen start > /lab/xen-start.log 2>&1
echo "toolstack_done $(uptime_s)" >> /lab/timings
if ! xl info > /lab/xl-info.txt 2>&1; then say "Xen toolstack did not come up (see xen-start.log)"; fi

mkdir -p /lab/out
export PYTHONPATH=/repo PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 XENDMOP_LAB_RESULTS=/lab/out
say "running the command"
cd /repo && /bin/sh /lab/command > /lab/stdout 2> /lab/stderr < /dev/null
echo $? > /lab/status.tmp
echo "command_done $(uptime_s)" >> /lab/timings
xl dmesg > /lab/xl-dmesg.txt 2>&1
dmesg > /lab/dom0-dmesg.txt 2>&1
mv /lab/status.tmp /lab/status
say "command exited $(cat /lab/status), powering off"
poweroff_now
