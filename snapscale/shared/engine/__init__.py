"""The engine: one sandbox on one host (launch, freeze, restore, suspend, resume, stop) with the
tools it drives (CRIU, the CUDA checkpoint API, network namespaces) and the compatibility key.
Services import these names, not the modules.
"""

from snapscale.shared.engine.compat import CompatKey, cuda_driver_version, host_key, read_gpus
from snapscale.shared.engine.criu import CriuBinary, find_criu
from snapscale.shared.engine.errors import CriuError, EngineError, refusal
from snapscale.shared.engine.forward import (
    Forward,
    PortForwards,
    forward_table_name,
    free_host_port,
    port_hint,
)
from snapscale.shared.engine.kdat import warn as warn_kdat_cache
from snapscale.shared.engine.lifecycle import (
    FreezeReport,
    ImageMeta,
    RestoreReport,
    after_resume,
    before_suspend,
    freeze,
    log_key,
    read_meta,
    read_weights,
    restore,
    resume,
    suspend,
    suspended_weights,
    wait_ready,
)
from snapscale.shared.engine.netns import (
    delete_netns,
    existing_netns,
    netns_inode,
    netns_owner,
    pids_in_netns,
)
from snapscale.shared.engine.procs import pid_alive, pids_holding
from snapscale.shared.engine.registry import SandboxRegistry
from snapscale.shared.engine.runtime import container_pids, exit_reason, launch, stop, stopped_by_freeze
from snapscale.shared.engine.runtime import sweep as sweep_containers
from snapscale.shared.engine.sandbox import Sandbox, is_running, tree_pids
from snapscale.workload import ChunkDir

__all__ = [
    "ChunkDir",
    "CompatKey",
    "CriuBinary",
    "CriuError",
    "EngineError",
    "Forward",
    "FreezeReport",
    "ImageMeta",
    "PortForwards",
    "RestoreReport",
    "Sandbox",
    "SandboxRegistry",
    "after_resume",
    "before_suspend",
    "container_pids",
    "cuda_driver_version",
    "delete_netns",
    "existing_netns",
    "exit_reason",
    "find_criu",
    "forward_table_name",
    "free_host_port",
    "freeze",
    "host_key",
    "is_running",
    "launch",
    "log_key",
    "netns_inode",
    "netns_owner",
    "pid_alive",
    "pids_holding",
    "pids_in_netns",
    "port_hint",
    "read_gpus",
    "read_meta",
    "read_weights",
    "refusal",
    "restore",
    "resume",
    "stop",
    "stopped_by_freeze",
    "suspend",
    "suspended_weights",
    "sweep_containers",
    "tree_pids",
    "wait_ready",
    "warn_kdat_cache",
]
