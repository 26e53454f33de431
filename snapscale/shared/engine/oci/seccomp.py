"""The default seccomp profile of an OCI sandbox, as runc reads it (config.json `linux.seccomp`).

Allow by default, refuse with EPERM what a contained workload has no business calling: mounting,
namespaces, kernel modules and keyrings, reboot and clock changes, tracing other processes, BPF.
Docker's default profile is an allow-list of ~350 calls; this deny-list covers the same
escape-relevant calls and stays readable. CRIU suspends the filter while it dumps
(PTRACE_O_SUSPEND_SECCOMP) and restores it with the process, so checkpoints are unaffected.
"""

from __future__ import annotations

from typing import Any

DENIED = (
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module", "delete_module",
    "finit_module", "fsconfig", "fsmount", "fsopen", "fspick", "get_kernel_syms", "init_module",
    "ioperm", "iopl", "kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie", "mount",
    "mount_setattr", "move_mount", "name_to_handle_at", "nfsservctl", "open_by_handle_at",
    "open_tree", "perf_event_open", "pivot_root", "process_vm_readv", "process_vm_writev",
    "ptrace", "query_module", "quotactl", "reboot", "request_key", "setns", "settimeofday",
    "stime", "swapoff", "swapon", "syslog", "umount", "umount2", "unshare", "uselib",
    "userfaultfd", "vhangup",
)  # fmt: skip
_EPERM = 1


def default_profile() -> dict[str, Any]:
    """The profile, fresh each call (callers may extend it). Pure."""
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64"],
        "syscalls": [{"names": list(DENIED), "action": "SCMP_ACT_ERRNO", "errnoRet": _EPERM}],
    }
