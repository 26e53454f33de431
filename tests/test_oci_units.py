"""The OCI sandbox's pure parts: the spec's [sandbox] door, config.json, the GPU list, image refs,
the compatibility key and the development-mode refusal."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from oci_image import probe_spec

from snapscale.shared.bus.sandbox_spec import Mount, SandboxSpec
from snapscale.shared.bus.spec import spec_from_mapping
from snapscale.shared.core.fieldcheck import FieldsError
from snapscale.shared.engine import compat, runtime
from snapscale.shared.engine.errors import EngineError
from snapscale.shared.engine.oci import gpu, images
from snapscale.shared.engine.oci.config import runtime_config, submounts
from snapscale.shared.engine.oci.container import CAP_SYS_RESOURCE, has_cap
from snapscale.shared.engine.oci.gpu import DeviceNode, HostGpus, HostListing, driver_libraries, gpu_access
from snapscale.shared.engine.oci.rootfs import check_mounts

DIGEST = "sha256:" + "ab" * 32
IMAGE = f"oci:/srv/images/sample@{DIGEST}"


def _problems(sandbox: dict[str, object]) -> list[str]:
    with pytest.raises(FieldsError) as e:
        spec_from_mapping({"name": "d", "command": ["x"], "sandbox": sandbox})
    return [str(p) for p in e.value.problems]


def test_the_door_refuses_bad_sandbox_fields_each_with_its_reason() -> None:
    got = _problems(
        {
            "image": "docker://busybox:latest",  # a tag, not a digest
            "user": "root",
            "memory_mib": 1,
            "pids": 0,
            "cpus": 0,
            "mounts": [{"src": "/srv/models", "dst": "/etc"}, {"src": "rel", "dst": "/m"}],
            "imgae": "x",
        }
    )
    joined = "\n".join(got)
    for want in (
        "sandbox.image: must be oci:",
        "sandbox.user: must be <uid>:<gid>",
        "sandbox.memory_mib: must be at least 16",
        "sandbox.pids: must be at least 8",
        "sandbox.cpus: must be above 0",
        "sandbox.mounts: [0]: dst /etc is reserved",
        "sandbox.imgae: unknown key (did you mean 'image'?)",
    ):
        assert want in joined, joined
    assert _problems({"mounts": [{"src": "/a/../etc", "dst": "/m"}]}) == [
        "sandbox.mounts: [0]: src must be an absolute, normalised path without ',' ('/a/../etc')"
    ]


def test_the_door_takes_each_kind_of_image_reference() -> None:
    for ref in (IMAGE, "docker-archive:/srv/a.tar", f"docker://registry.local/app@{DIGEST}"):
        spec = spec_from_mapping({"name": "d", "command": ["x"], "sandbox": {"image": ref}})
        assert spec.sandbox.image == ref
        assert spec.sandbox.user == "1000:1000"  # not root by default


def test_runtime_config_contains_the_workload() -> None:
    spec = probe_spec("d", IMAGE, memory_mib=300)
    c = runtime_config(
        spec,
        rootfs="/r/rootfs",
        netns_path="/run/netns/snapscale-7",
        env={"A": "1"},
        cgroups_path="/s/r",
        hostname="r",
    )
    p, lx = c["process"], c["linux"]
    assert p["user"] == {"uid": 1000, "gid": 1000} and p["noNewPrivileges"] is True
    assert (
        "CAP_SYS_ADMIN" not in p["capabilities"]["bounding"]
        and "CAP_SYS_PTRACE" not in p["capabilities"]["bounding"]
    )
    assert "CAP_NET_ADMIN" not in p["capabilities"]["effective"]
    ns = {n["type"]: n.get("path") for n in lx["namespaces"]}
    assert ns == {"pid": None, "ipc": None, "uts": None, "mount": None, "network": "/run/netns/snapscale-7"}
    assert lx["resources"]["memory"] == {"limit": 300 << 20, "swap": 300 << 20}
    assert lx["resources"]["pids"] == {"limit": 128}
    assert lx["resources"]["cpu"]["quota"] == 100_000
    assert lx["resources"]["devices"][0] == {"allow": False, "access": "rwm"}
    denied = lx["seccomp"]["syscalls"][0]["names"]
    assert {"mount", "unshare", "setns", "ptrace", "bpf"} <= set(denied)
    assert "/proc/kcore" in lx["maskedPaths"]
    binds = [m for m in c["mounts"] if m["type"] == "bind"]
    assert binds == [
        {
            "destination": "/usr",
            "type": "bind",
            "source": "/usr",
            "options": ["bind", "ro", "nosuid", "nodev"],
        }
    ]
    [scratch] = [m for m in c["mounts"] if m["destination"] == "/scratch"]
    assert "size=16m" in scratch["options"] and "uid=1000" in scratch["options"]
    json.dumps(c)  # runc reads it as JSON


LDCONFIG = """\
1234 libs found in cache `/etc/ld.so.cache'
	libnvidia-ml.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvidia-ml.so.1
	libcuda.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libcuda.so.1
	libcuda.so.1 (libc6) => /lib/i386-linux-gnu/libcuda.so.1
	libcuda.so (libc6,x86-64) => /lib/x86_64-linux-gnu/libcuda.so
	libnvidia-ptxjitcompiler.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.1
	libc.so.6 (libc6,x86-64, OS ABI: Linux 3.2.0) => /lib/x86_64-linux-gnu/libc.so.6
"""


def test_gpu_access_gives_only_the_assigned_cards_and_the_driver_libraries() -> None:
    host = HostGpus(
        nodes=[
            DeviceNode("/dev/nvidiactl", 195, 255),
            DeviceNode("/dev/nvidia-uvm", 508, 0),
            DeviceNode("/dev/nvidia0", 195, 0),
            DeviceNode("/dev/nvidia1", 195, 1),
        ],
        ldconfig=LDCONFIG,
        minors={"GPU-a": 0, "GPU-b": 1},
    )
    acc = gpu_access(host, ["GPU-b"])
    assert [d["path"] for d in acc.devices] == ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia1"]
    assert {(a["major"], a["minor"]) for a in acc.allow} == {(195, 255), (508, 0), (195, 1)}
    libs = [m["source"] for m in acc.mounts]
    assert (
        libs
        == driver_libraries(LDCONFIG)
        == [
            "/lib/x86_64-linux-gnu/libcuda.so",
            "/lib/x86_64-linux-gnu/libcuda.so.1",
            "/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
            "/lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.1",
        ]
    )
    assert all("ro" in m["options"] for m in acc.mounts)
    with pytest.raises(ValueError, match="GPU-c is not on this host"):
        gpu_access(host, ["GPU-c"])
    spec = probe_spec("d", IMAGE)
    c = runtime_config(spec, rootfs="/r", netns_path="/n", env={}, cgroups_path="/c", hostname="h", gpu=acc)
    assert [d["path"] for d in c["linux"]["devices"]] == ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia1"]


async def test_the_hosts_gpu_listing_is_read_once_and_again_only_for_a_gpu_it_lacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NVML's init and `ldconfig -p` sat on every GPU restore's critical path: the listing is read
    at the first GPU launch of a process, and again only when a launch names a GPU it lacks (a
    card added or reset since). The listing here stands in for a GPU host's (no GPU on this VM)."""
    cards = {"GPU-a": 0}
    reads: list[dict[str, int]] = []

    def read() -> HostGpus:
        reads.append(dict(cards))
        nodes = [DeviceNode("/dev/nvidiactl", 195, 255)]
        nodes += [DeviceNode(f"/dev/nvidia{m}", 195, m) for m in cards.values()]
        return HostGpus(nodes=nodes, ldconfig=LDCONFIG, minors=dict(cards))

    monkeypatch.setattr(gpu, "_read_host", read)
    listing = HostListing()
    for _ in range(3):
        acc = await listing.access(["GPU-a"])
        assert [d["path"] for d in acc.devices] == ["/dev/nvidiactl", "/dev/nvidia0"]
    assert len(reads) == 1
    cards["GPU-b"] = 1  # a card the kept listing lacks: read again, then given
    assert [d["path"] for d in (await listing.access(["GPU-b"])).devices][-1] == "/dev/nvidia1"
    assert len(reads) == 2
    with pytest.raises(ValueError, match="GPU-c is not on this host"):
        await listing.access(["GPU-c"])
    assert len(reads) == 3


def test_image_refs_parse_and_a_layout_tag_is_found_by_digest() -> None:
    assert images.parse_ref(IMAGE) == images.ImageRef("oci", "/srv/images/sample", DIGEST)
    assert images.parse_ref("docker-archive:/a.tar") == images.ImageRef("docker-archive", "/a.tar", None)
    index = {
        "manifests": [
            {"digest": "sha256:00", "annotations": {}},
            {"digest": DIGEST, "annotations": {"org.opencontainers.image.ref.name": "v1"}},
        ]
    }
    assert images.oci_tag(index, DIGEST) == "v1"
    with pytest.raises(EngineError, match="no manifest"):
        images.oci_tag(index, "sha256:" + "cd" * 32)
    with pytest.raises(EngineError, match=r"no ref\.name"):
        images.oci_tag(index, "sha256:00")


def test_the_image_digest_is_the_runtime_identity_in_the_compatibility_key(tmp_path: Path) -> None:
    a = probe_spec("d", IMAGE)
    b = probe_spec("d", f"oci:/elsewhere@{DIGEST}")  # the same image from another layout
    c = probe_spec("d", f"oci:/srv/images/sample@sha256:{'cd' * 32}")
    assert compat.runtime_fingerprint(a) == compat.runtime_fingerprint(b) != compat.runtime_fingerprint(c)
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"one")
    d = probe_spec("d", f"docker-archive:{archive}")
    before = compat.runtime_fingerprint(d)
    archive.write_bytes(b"two")
    assert compat.runtime_fingerprint(d) != before


def test_a_spec_without_an_image_is_refused_outside_development_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = spec_from_mapping({"name": "d", "command": ["x"]})
    monkeypatch.delenv("SNAPSCALE_SANDBOX", raising=False)
    with pytest.raises(
        EngineError, match=r"names no sandbox.image; host-process sandboxes run only .*SNAPSCALE_SANDBOX=host"
    ):
        runtime.check_runnable(spec, "launch")
    runtime.check_runnable(probe_spec("d", IMAGE), "launch")  # an image runs anywhere
    monkeypatch.setenv("SNAPSCALE_SANDBOX", "host")
    runtime.check_runnable(spec, "launch")


def test_has_cap_reads_the_effective_set() -> None:
    assert has_cap(CAP_SYS_RESOURCE, "Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert not has_cap(CAP_SYS_RESOURCE, "CapEff:\t000001fffeffffff\n")


def test_a_spec_mounts_only_what_the_host_allows() -> None:
    spec = replace(
        probe_spec("d", IMAGE),
        sandbox=SandboxSpec(image=IMAGE, mounts=[Mount("/usr", "/usr"), Mount("/etc", "/host-etc")]),
    )
    with pytest.raises(
        EngineError,
        match=r"sandbox.mounts\[1\].src /etc is outside .*SNAPSCALE_SANDBOX_MOUNTS=/usr:/srv/models",
    ):
        check_mounts(spec, ["/usr", "/srv/models"])
    check_mounts(spec, ["/usr", "/etc"])
    with pytest.raises(EngineError, match=r"SNAPSCALE_SANDBOX_MOUNTS=<none>"):
        check_mounts(spec, [])
    with pytest.raises(EngineError, match=r"/usrx"):  # a prefix of a name is not its parent
        check_mounts(replace(spec, sandbox=SandboxSpec(image=IMAGE, mounts=[Mount("/usrx", "/x")])), ["/usr"])


MOUNTINFO = """\
22 1 0:21 / / rw,relatime - overlay overlay rw
29 22 254:16 / /usr/local/nvidia ro,nosuid,nodev,relatime - squashfs /dev/vdb ro
30 29 0:40 / /usr/local/nvidia/lib64/extra rw - tmpfs tmpfs rw
31 22 0:41 / /usr2/x rw - tmpfs tmpfs rw
32 22 0:42 / /models/with\\040space rw - tmpfs tmpfs rw
"""


def test_a_declared_mounts_submounts_are_bound_one_by_one_for_criu() -> None:
    """A GPU host's /usr/local/nvidia (a squashfs under /usr) failed the dump while /usr was bound
    recursively: every mount below a declared one is its own bind, which runc names to CRIU as
    external; mounts beside it (/usr2) are not taken."""
    below = submounts(MOUNTINFO, ["/usr", "/models", "/srv"])
    assert below == {
        "/usr": ["/usr/local/nvidia", "/usr/local/nvidia/lib64/extra"],
        "/models": ["/models/with space"],
    }
    base = probe_spec("d", IMAGE)
    spec = replace(base, sandbox=replace(base.sandbox, mounts=[Mount(src="/usr", dst="/host/usr")]))
    c = runtime_config(
        spec, rootfs="/r", netns_path="/run/netns/n", env={}, cgroups_path="/c", hostname="h", below=below
    )
    binds = [(m["source"], m["destination"], m["options"][0]) for m in c["mounts"] if m["type"] == "bind"]
    assert binds == [
        ("/usr", "/host/usr", "bind"),
        ("/usr/local/nvidia", "/host/usr/local/nvidia", "bind"),
        ("/usr/local/nvidia/lib64/extra", "/host/usr/local/nvidia/lib64/extra", "bind"),
    ]
