#!/bin/sh
# CI entry point for the Xen lab: boot Xen under QEMU and run integration/ in dom0.
# Exits 0 saying so plainly when the lab is unavailable on this host (no QEMU/mmdebstrap
# and no way to install them, or no Debian mirror); otherwise with the tests' status, or
# the runner's 123 (Xen/dom0 crash), 124 (timeout), 125 (boot or image build failed, after
# one retry).  The runner's last lines name each report with its summary.
# The timeout (45 min, $XENDMOP_LAB_TIMEOUT) keeps all of .ci/run inside CI's hour with the
# Linux HVM guests' boots (the whole lab run takes 15-25 min on an idle 2-core host).
set -u
cd "$(dirname "$0")/../.."
lab() {
    python3 integration/lab/run.py --timeout "${XENDMOP_LAB_TIMEOUT:-2700}" -- \
        python3 integration/run_tests.py -p no:cacheprovider -q -rs integration/
}
lab
rc=$?
if [ "$rc" -eq 125 ]; then
    # A boot that never reached dom0's init (seen once under TCG) or a failed image build:
    # every run starts from a pristine snapshot, so one more try is a fair retry.
    echo "xendmop-lab: boot failed (125); trying once more"
    lab
    rc=$?
fi
if [ "$rc" -eq 77 ]; then
    echo "xendmop-lab: LAB UNAVAILABLE on this host: integration tests not run (not a failure)"
    exit 0
fi
exit "$rc"
