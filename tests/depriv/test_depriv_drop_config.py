"""Who to become (the libxl convention) and configuration checks made before any change."""

from __future__ import annotations

import pwd
import threading

import pytest

from xendmop.depriv import (
    QEMU_USER_RANGE_BASE,
    DeprivConfigError,
    DropConfig,
    RLimits,
    fixed_user_ids,
    libxl_range_ids,
)
from xendmop.depriv.drop import capabilities, prctl

from .helpers import needs_root


def user(name: str, uid: int, gid: int) -> pwd.struct_passwd:
    return pwd.struct_passwd((name, "x", uid, gid, "", "/", "/usr/sbin/nologin"))


USERS = {QEMU_USER_RANGE_BASE: user(QEMU_USER_RANGE_BASE, 50000, 50000), "dmuser": user("dmuser", 1234, 1235)}
BY_UID = {u.pw_uid: u for u in USERS.values()} | {50009: user("someone", 50009, 100)}


def getpwnam(name: str) -> pwd.struct_passwd:
    return USERS[name]


def getpwuid(uid: int) -> pwd.struct_passwd:
    return BY_UID[uid]


def test_range_base_plus_domid():
    ids = libxl_range_ids(5, getpwnam=getpwnam, getpwuid=getpwuid)
    assert (ids.uid, ids.gid) == (50005, 50000) and QEMU_USER_RANGE_BASE in ids.source
    ids = libxl_range_ids(5, per_domain_gid=True, getpwnam=getpwnam, getpwuid=getpwuid)
    assert (ids.uid, ids.gid) == (50005, 50005)


def test_range_refusals():
    with pytest.raises(DeprivConfigError, match="that is user 'someone'"):
        libxl_range_ids(9, getpwnam=getpwnam, getpwuid=getpwuid)
    with pytest.raises(DeprivConfigError, match="no user 'nobody-here'"):
        libxl_range_ids(5, "nobody-here", getpwnam=getpwnam, getpwuid=getpwuid)
    with pytest.raises(DeprivConfigError, match="guest domid"):
        libxl_range_ids(0, getpwnam=getpwnam, getpwuid=getpwuid)
    rootish = {"base": user("base", 0, 0)}
    with pytest.raises(DeprivConfigError):
        libxl_range_ids(1, "base", getpwnam=rootish.__getitem__, getpwuid=getpwuid)


def test_fixed_user():
    ids = fixed_user_ids("dmuser", getpwnam=getpwnam)
    assert (ids.uid, ids.gid) == (1234, 1235)
    with pytest.raises(DeprivConfigError):
        fixed_user_ids("root", getpwnam=lambda n: user("root", 0, 0))


@pytest.mark.parametrize(
    "config",
    [
        DropConfig(uid=0, gid=100, no_new_privs=False),
        DropConfig(uid=100, gid=0, no_new_privs=False),
        DropConfig(uid=100, gid=None, no_new_privs=False),
        DropConfig(uid=True, gid=100, no_new_privs=False),
        DropConfig(uid=2**32 - 1, gid=100, no_new_privs=False),
    ],
)
def test_bad_ids(config):
    with pytest.raises(DeprivConfigError):
        config.validate()


@needs_root
def test_chroot_must_be_an_empty_root_owned_directory(tmp_path, empty_root):
    DropConfig(uid=None, gid=None, chroot=empty_root, no_new_privs=False).validate()
    with pytest.raises(DeprivConfigError, match="nonexistent"):
        DropConfig(uid=None, gid=None, chroot=tmp_path / "nonexistent", no_new_privs=False).validate()
    (tmp_path / "file").write_text("")
    with pytest.raises(DeprivConfigError, match="not a directory"):
        DropConfig(uid=None, gid=None, chroot=tmp_path / "file", no_new_privs=False).validate()
    (empty_root / "etc").mkdir()
    with pytest.raises(DeprivConfigError, match="not empty"):
        DropConfig(uid=None, gid=None, chroot=empty_root, no_new_privs=False).validate()
    DropConfig(uid=None, gid=None, chroot=empty_root, no_new_privs=False, require_empty_root=False).validate()
    empty_root.chmod(0o777)
    with pytest.raises(DeprivConfigError, match="writable by nobody else"):
        DropConfig(uid=None, gid=None, chroot=empty_root, no_new_privs=False, require_empty_root=False).validate()


def test_no_new_privs_refused_with_threads_running():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, args=(10,))
    thread.start()
    try:
        with pytest.raises(DeprivConfigError, match="threads"):
            DropConfig(uid=None, gid=None).validate()
    finally:
        stop.set()
        thread.join(10)


def test_rlimit_defaults_follow_the_design_doc():
    names = {name: value for name, _, value in RLimits().items()}
    assert names == {"FSIZE": 256 * 1024, "NPROC": 1, "CORE": 0, "NOFILE": 256, "MSGQUEUE": 0}
    assert [n for n, _, _ in RLimits(nproc=None, msgqueue=None).items()] == ["FSIZE", "CORE", "NOFILE"]


def test_libc_helpers_read_this_process():
    assert prctl(39) in (0, 1)  # PR_GET_NO_NEW_PRIVS
    effective, permitted, _ = capabilities()
    assert effective & ~permitted == 0
