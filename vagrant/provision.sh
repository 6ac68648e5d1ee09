#!/bin/sh
# Provisioning of the Vagrant Xen lab (runs as root inside the Debian 12 VM).
#   provision.sh install   Xen + packages from integration/lab/packages.txt, Xen default in GRUB
#   provision.sh test      install xendmop from /xendmop into a venv, run integration/ in dom0
set -eu
SRC=/xendmop
VENV=/opt/xendmop-venv
export DEBIAN_FRONTEND=noninteractive

install_xen() {
    # The same package list as the QEMU lab's dom0 image: the two labs cannot drift.
    # (this VM is amd64: lines for other architectures only are left out)
    pkgs=$(sed -e 's/#.*//' -e '/\[/{/\[[^]]*amd64[^]]*\]/!d}' -e 's/\[[^]]*\]//' \
        "$SRC/integration/lab/packages.txt" | tr -s ' \t\n' ' ')
    apt-get update -q
    # shellcheck disable=SC2086  # one word per package
    apt-get install -y -q $pkgs python3-venv python3-pip grub-pc-bin
    # Debian's Xen GRUB entries come after the plain Linux ones; moving the script that makes
    # them in front (the Debian wiki's way, a dpkg diversion survives upgrades) makes Xen
    # the default entry.
    if [ -e /etc/grub.d/20_linux_xen ]; then
        dpkg-divert --divert /etc/grub.d/08_linux_xen --rename /etc/grub.d/20_linux_xen
    fi
    cat > /etc/default/grub.d/xendmop-xen.cfg <<'CFG'
# xendmop lab: dom0 gets 1 GiB, guests the rest; a big console ring for `xl dmesg`.
GRUB_CMDLINE_XEN_DEFAULT="dom0_mem=1024M,max:1024M dom0_max_vcpus=2 loglvl=all guest_loglvl=all conring_size=4M"
CFG
    update-grub
    echo "xendmop-lab: Xen installed; rebooting into it"
}

run_tests() {
    if ! grep -q control_d /proc/xen/capabilities 2>/dev/null; then
        echo "xendmop-lab: not running as Xen dom0 (did the VM boot Xen? is nested virtualisation on?)" >&2
        xl info 2>&1 | head -5 >&2 || true
        exit 1
    fi
    # Debian's python3-* packages (the lab's floor versions) plus xendmop itself.
    python3 -m venv --system-site-packages "$VENV"
    "$VENV/bin/pip" install -q --no-deps "$SRC"
    xl info | grep -E '^(xen_version|virt_caps)'
    cd "$SRC"
    "$VENV/bin/python" -m pytest -p no:cacheprovider -q -rs integration/
}

case "${1:-}" in
    install) install_xen ;;
    test) run_tests ;;
    *) echo "usage: $0 install|test" >&2; exit 2 ;;
esac
