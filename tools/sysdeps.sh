#!/bin/sh
# Install the Debian/Ubuntu packages xendmop's tests use, if any are missing:
# python3-venv (the venv), gcc (C probes), libxen-dev + linux-libc-dev (the real
# headers the ABI mirrors are checked against), libxendevicemodel1 & co. (the C
# libraries the golden-bytes test and the libxen backend call).
# Without root or sudo it only says what is missing; the tests then skip with that reason.
set -eu
pkgs="python3-venv gcc libc6-dev make libxen-dev linux-libc-dev libxendevicemodel1 libxenforeignmemory1 libxenevtchn1 libxentoolcore1 $*"
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "sysdeps: not a Debian/Ubuntu system; please install:$missing" >&2
    exit 0
fi
if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "sysdeps: missing:$missing (run as root to install them); dependent tests will skip" >&2
    exit 0
fi
echo "sysdeps: installing$missing"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
