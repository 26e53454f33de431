"""Pure parts of the engine: CRIU argument lists and stats parsing, HTTP response parsing, subnet
allocation, the workload's argv and environment, the image meta file."""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

import pytest

from snapscale.shared.bus.spec import DeploymentSpec, load_spec
from snapscale.shared.engine import criu, extfiles, netns, probe, sandbox
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.engine.errors import EngineError

B = CriuBinary("/opt/criu", "4.2.1")


def test_dump_argv() -> None:
    argv = criu.dump_argv(
        B, 77, Path("/img"), netns_inode=4026532000, leave_running=True, log_path=Path("/l")
    )
    assert argv[:4] == ["/opt/criu", "dump", "-t", "77"]
    assert "--external" in argv and "net[4026532000]:extnet" in argv and "mnt[]" in argv
    assert argv[argv.index("--network-lock") + 1] == "skip"
    assert "--tcp-established" in argv
    assert "--leave-running" in argv
    assert "--leave-running" not in criu.dump_argv(
        B, 77, Path("/img"), netns_inode=1, leave_running=False, log_path=Path("/l")
    )


def test_dump_argv_names_files_held_from_outside_by_key() -> None:
    key = extfiles.file_key(27, 0x1F2A)
    assert key == "file[1b:1f2a]"  # CRIU's files-reg.c: both hex
    argv = criu.dump_argv(
        B, 77, Path("/img"), netns_inode=1, leave_running=False, log_path=Path("/l"), external_files=[key]
    )
    assert argv[argv.index(key) - 1] == "--external"


def test_mount_ids_and_an_fds_mount() -> None:
    info = "27 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n603 27 0:5 / /dev rw - devtmpfs udev rw\n"
    assert extfiles.mount_ids(info) == {27, 603}
    assert extfiles.fd_mount_id("pos:\t0\nflags:\t02102001\nmnt_id:\t27\nino:\t12\n") == 27
    assert extfiles.fd_mount_id("pos:\t0\n") is None


def test_restore_argv() -> None:
    argv = criu.restore_argv(
        B, Path("/img"), inherit={"extnet": 5, "tmp/log": 6}, log_path=Path("/run-a/l"), pidfile=Path("/p")
    )
    assert argv[:3] == ["/opt/criu", "restore", "-d"]
    # stats-restore in the replica's dir, not in an image others may be restoring from at once
    assert argv[argv.index("-D") + 1] == "/img" and argv[argv.index("-W") + 1] == "/run-a"
    assert "fd[5]:extnet" in argv and "fd[6]:tmp/log" in argv
    assert argv[argv.index("--pidfile") + 1] == "/p"
    assert argv[argv.index("--root") + 1] == "/" and argv[argv.index("--ext-mount-map") + 1] == "auto"
    assert "--tcp-established" in argv and argv[argv.index("--network-lock") + 1] == "skip"


def test_old_criu_is_refused() -> None:
    with pytest.raises(Exception, match="too old"):
        criu.require_version(CriuBinary("/x", "4.1.1"))


def _pb_varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def test_parse_stats() -> None:
    dump = _pb_varint(1 << 3) + _pb_varint(116) + _pb_varint(7 << 3) + _pb_varint(300_000)
    entry = _pb_varint((1 << 3) | 2) + _pb_varint(len(dump)) + dump
    img = struct.pack("<II", 0x55105940, 0x57093306) + struct.pack("<I", len(entry)) + entry
    assert criu.parse_stats(img) == {"freezing_time_us": 116, "pages_written": 300_000}
    with pytest.raises(ValueError, match="too short"):
        criu.parse_stats(b"\0" * 4)


def test_error_lines_skip_noise(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_text(
        "rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
        "(00.01) ok\n(00.02) Error (criu/cr-restore.c:1): Can't read pstree\n"
    )
    assert criu.error_lines(log) == "(00.02) Error (criu/cr-restore.c:1): Can't read pstree"
    assert "no CRIU log" in criu.error_lines(tmp_path / "missing.log")


def test_parse_response() -> None:
    assert probe.parse_response(b"HTTP/1.0 204 No Content\r\nA: b\r\n\r\n") == (204, b"")
    assert probe.parse_response(b"HTTP/1.1 200 OK\r\n\r\n{}") == (200, b"{}")
    for bad in (b"", b"garbage", b"HTTP/1.0 abc\r\n\r\n"):
        with pytest.raises(ValueError, match="not an HTTP response"):
            probe.parse_response(bad)
    assert probe.split_endpoint("10.213.0.2:8000") == ("10.213.0.2", 8000)
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        probe.split_endpoint("nope")


def test_subnets() -> None:
    ns = netns.NetNs(name="snapscale-3", index=3)
    assert (ns.host_ip, ns.sandbox_ip, ns.host_if) == ("10.213.0.13", "10.213.0.14", "ssv3")
    assert netns.free_slot({5, 6}, 5) == 7
    assert netns.free_slot(set(), 9) == 9
    assert netns.parse_name("snapscale-12").index == 12
    with pytest.raises(EngineError):
        netns.parse_name("other-1")
    assert netns.hint("r1") == netns.hint("r1")


def test_workload_argv_and_env() -> None:
    spec = DeploymentSpec(name="d", command=["python3", "-m", "x"], env={"A": "1", "PATH": "/opt/bin"})
    argv = sandbox.launch_argv(spec, Path("/run/netns/snapscale-1"), Path("/r/sandbox.log"))
    assert argv[:3] == ["nsenter", "--net=/run/netns/snapscale-1", "unshare"]
    assert {"--pid", "--mount", "--mount-proc"} <= set(argv)
    assert argv[-4:] == ["/r/sandbox.log", "python3", "-m", "x"] and argv[-5].endswith("sandbox_init.py")
    env = sandbox.workload_env(spec, ["GPU-a", "GPU-b"])
    assert env["A"] == "1" and env["PATH"] == "/opt/bin" and env["CUDA_VISIBLE_DEVICES"] == "GPU-a,GPU-b"
    assert not any(k.startswith("SNAPSCALE_") for k in env)
    assert sandbox.workload_env(spec, [])["CUDA_VISIBLE_DEVICES"] == ""
    # GPU sandboxes too: their own /proc is what lets CUDA initialise in a PID namespace.
    gpu = DeploymentSpec(name="g", command=["python3"], gpus=1)
    assert "--mount-proc" in sandbox.launch_argv(gpu, Path("/n"), Path("/l"))


def test_image_meta_round_trip_and_refusal() -> None:
    m = engine.ImageMeta(
        deployment="d", log_key="tmp/x/sandbox.log", cuda=True, gpu_uuids=["GPU-a"], port=8000, frozen_at=1.0
    )
    assert engine.ImageMeta.from_json(m.to_json()) == m
    assert engine.log_key("/tmp/x/sandbox.log") == "tmp/x/sandbox.log"
    with pytest.raises(EngineError, match="unreadable"):
        engine.ImageMeta.from_json(b'{"format": 99}')
    with pytest.raises(EngineError, match="unreadable"):
        engine.ImageMeta.from_json(b"\xff")


@pytest.mark.parametrize("name", ["sample_cpu.toml", "sample_cpu_quick.toml"])
def test_sample_cpu_specs_load(name: str) -> None:

    spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / name)
    assert spec.name == "sample-cpu" and spec.gpus == 0 and spec.port == 8000
    assert spec.hooks.before_freeze == "/hooks/before_freeze" and spec.ready.http_path == "/healthz"
    assert "examples.sample_server.server" in spec.command


def test_the_demo_cpu_sample_warms_like_a_model_server_and_the_quick_one_does_not() -> None:
    """The demo's CPU sample compiles and warms up a model of tens of millions of parameters on
    every cold boot (no FX-graph cache); the tests' quick one loads the tiny model and nothing else."""
    root = Path(__file__).resolve().parents[1] / "examples"
    demo, quick = load_spec(root / "sample_cpu.toml"), load_spec(root / "sample_cpu_quick.toml")
    cmd = demo.command
    assert cmd[cmd.index("--preset") + 1] == "llama-55m" and "--compile" in cmd
    assert int(cmd[cmd.index("--warmup") + 1]) > 0
    assert demo.env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "0"
    assert demo.env["TORCHINDUCTOR_COMPILE_THREADS"] == "1"
    assert demo.ready.timeout_s >= 300 and demo.scaling.ready_timeout_s >= 300
    assert quick.command[quick.command.index("--preset") + 1] == "tiny" and "--compile" not in quick.command


def test_sample_gpu_spec_loads() -> None:

    spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / "sample_gpu.toml")
    assert spec.gpus == 1 and "--compile" in spec.command and "--graph" in spec.command
    assert spec.env["TORCHINDUCTOR_COMPILE_THREADS"] == "1"


def _model_args(tmp_path: Path, **kw: object) -> argparse.Namespace:
    """The sample server's arguments for the tiny model on the CPU, `kw` changed."""
    base = dict(preset="tiny", weights=str(tmp_path / "w.pt"), device="cpu", kv_device=None,
                dtype="fp32", compile=False, graph=False, kv_mib=1, seed=0, warmup=0)  # fmt: skip
    return argparse.Namespace(**(base | kw))


@pytest.mark.filterwarnings("ignore:Failed to initialize NumPy")
def test_sample_model_keeps_its_kv_cache_where_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/two_gpu.py puts the KV cache on a second card with --kv-device; on the CPU both are
    the CPU, and the answer says where each part lives (the same answer as without the flag)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # the repo's examples/
    from examples.sample_server.server import Model

    def args(**kw: object) -> argparse.Namespace:
        return _model_args(tmp_path, **kw)

    plain, placed = Model(args()).generate(), Model(args(kv_device="cpu")).generate()
    assert placed["kv_device"] == "cpu" and plain["kv_device"] == "cpu"
    assert placed == plain


@pytest.mark.filterwarnings("ignore:Failed to initialize NumPy")
def test_sample_model_warms_up_through_the_serving_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--warmup sends requests through `generate` before ready. Its prompt is an inference tensor,
    like every input `generate` makes: a compiled forward guards on that, and a prompt made
    outside inference mode had the first request compile a second variant (16 s on the CPU demo
    sample)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from examples.sample_server.server import Model

    warm = Model(_model_args(tmp_path, warmup=2))
    assert warm.prompt.is_inference()
    assert warm.timings["warmup_s"] > 0
    assert "warmup_s" not in Model(_model_args(tmp_path)).timings
    assert warm.generate() == Model(_model_args(tmp_path)).generate()
