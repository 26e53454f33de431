"""CRIU keeps its probe of the kernel only on a tmpfs /run (engine/kdat.py): which filesystem holds
/run, read from mountinfo texts (engine/mountinfo.py), and what an operator is told."""

from __future__ import annotations

from snapscale.shared.engine.kdat import cache_warning
from snapscale.shared.engine.mountinfo import fs_type_of

ROOT = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw"
RUN_TMPFS = "25 22 0:21 / /run rw,nosuid,nodev shared:5 - tmpfs tmpfs rw,mode=755"
NETNS = "31 25 0:4 / /run/netns/ns-a rw shared:9 - nsfs nsfs rw"
CONTAINER_ROOT = "600 500 0:55 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/l,upperdir=/u"


def test_run_on_the_root_filesystem_is_the_root_s_type() -> None:
    assert fs_type_of(ROOT, "/run") == "ext4"
    assert fs_type_of(CONTAINER_ROOT, "/run") == "overlay"


def test_a_tmpfs_at_run_wins_over_the_root_and_mounts_below_it_do_not_count() -> None:
    assert fs_type_of("\n".join([ROOT, RUN_TMPFS, NETNS]), "/run") == "tmpfs"
    assert fs_type_of("\n".join([ROOT, NETNS]), "/run") == "ext4"  # /run/netns/x is below /run
    assert fs_type_of("\n".join([ROOT, "26 22 0:22 / /running rw - tmpfs t rw"]), "/run") == "ext4"


def test_the_last_of_two_mounts_at_one_point_is_the_one_seen() -> None:
    over = "40 25 0:30 / /run rw - ramfs ramfs rw"
    assert fs_type_of("\n".join([ROOT, RUN_TMPFS, over]), "/run") == "ramfs"
    assert fs_type_of("\n".join([ROOT, over, RUN_TMPFS]), "/run") == "tmpfs"


def test_escaped_mount_points_and_short_lines() -> None:
    spaced = r"41 22 0:31 / /my\040run rw - tmpfs t rw"
    assert fs_type_of("\n".join([ROOT, spaced, "garbage", ""]), "/my run") == "tmpfs"
    assert fs_type_of("", "/run") is None


def test_the_operator_is_told_only_when_run_is_not_a_tmpfs() -> None:
    assert cache_warning("\n".join([ROOT, RUN_TMPFS])) is None
    assert cache_warning("") is None  # nothing known: nothing said
    msg = cache_warning(CONTAINER_ROOT)
    assert msg is not None and "/run is overlay, not a tmpfs" in msg and "criu.kdat" in msg
