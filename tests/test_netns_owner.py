"""Network namespaces name their owner: a restorer sweeping after a crash removes the ones made for
its own run dirs, with every process inside, and never another restorer's or an unowned one
(namespaces are host-wide; other restorers, tests and operators share the host)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from snapscale.restorer.cleanup import owned_netns, sweep
from snapscale.shared.engine import netns, pid_alive

pytestmark = pytest.mark.criu  # root: ip netns


async def test_only_the_namespaces_of_this_run_root_are_swept(tmp_path: Path) -> None:
    ours = tmp_path / "work" / "run" / "r1.abc"
    theirs = tmp_path / "other" / "run" / "r2.def"
    made = [
        await netns.create("r1", owner=ours),
        await netns.create("r2", owner=theirs),
        await netns.create("r3"),  # names no owner (an engine caller outside any restorer)
    ]
    sleeper: asyncio.subprocess.Process | None = None
    try:
        assert [netns.netns_owner(n.name) for n in made] == [ours.resolve(), theirs.resolve(), None]
        run_root = tmp_path / "work" / "run"
        mine = owned_netns(run_root, keep=set())
        assert mine == [made[0].name]
        assert owned_netns(run_root, keep={made[0].name}) == []  # a live sandbox's is kept
        sleeper = await asyncio.create_subprocess_exec("ip", "netns", "exec", made[0].name, "sleep", "60")
        for _ in range(100):  # until it has entered the namespace
            if sleeper.pid in netns.pids_in_netns(made[0].name):
                break
            await asyncio.sleep(0.02)
        assert sleeper.pid in netns.pids_in_netns(made[0].name)

        killed = await sweep([], mine)
        assert sleeper.pid in killed
        await asyncio.wait_for(sleeper.wait(), 10)
        assert not pid_alive(sleeper.pid)
        assert not made[0].path.exists() and netns.netns_owner(made[0].name) is None
        assert made[1].path.exists() and made[2].path.exists()  # not this restorer's
    finally:
        if sleeper is not None and sleeper.returncode is None:
            sleeper.kill()
            await sleeper.wait()
        for n in made:
            with contextlib.suppress(Exception):
                await netns.delete_netns(n.name)
    assert all(netns.netns_owner(n.name) is None for n in made)  # deleting forgets the owner


async def test_a_create_cancelled_mid_way_leaves_no_namespace(tmp_path: Path) -> None:
    """The namespace is made on a thread, which a cancel cannot stop: what it made is undone."""
    replica = f"cancelled-{os.getpid()}"
    t = asyncio.create_task(netns.create(replica, owner=tmp_path / "run"))
    await asyncio.sleep(0.002)  # the thread is under way
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    await asyncio.sleep(0.5)  # a thread left running would have made it by now
    names = {n.name for n in netns.existing_netns()}
    assert f"{netns.PREFIX}{netns.hint(replica)}" not in names, "netns leaked"
