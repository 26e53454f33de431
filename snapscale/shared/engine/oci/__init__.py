"""OCI sandboxes: a deployment's image run by runc, contained (user, capabilities, seccomp, cgroups,
only its own root and declared mounts), checkpointed and restored through `runc checkpoint/restore`.

config.py (spec -> config.json, pure), seccomp.py (the default profile), gpu.py (device nodes and
driver libraries, pure), images.py (the host's content-addressed image store), runc.py (the runtime's
command lines), container.py (launch, checkpoint, restore, stop of one replica).
"""
