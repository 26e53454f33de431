"""The bus: NATS connections, JetStream streams and KV buckets, the one consumer loop, the messages and
subjects the services exchange, the deployment spec, the checkpoint catalog and the command ledger.
Services import these names, not the modules.
"""

from snapscale.shared.bus.catalog import CatalogEntry, decode_entry, list_entries, lookup_entry, publish_entry
from snapscale.shared.bus.client import (
    Bus,
    connect,
    ensure_topology,
    kv_cas,
    kv_get,
    open_bus,
    publish,
    publish_core,
    subscribe_core,
    through_elections,
)
from snapscale.shared.bus.consumer import Handler, consume
from snapscale.shared.bus.ledger import Ledger
from snapscale.shared.bus.messages import (
    CheckpointEvent,
    FreezeCommand,
    GpuInfo,
    HostHeartbeat,
    M,
    PrefetchCommand,
    ReleaseCommand,
    ReleaseMode,
    ReplicaEvent,
    ReplicaState,
    ReplicaSummary,
    ScaleUpCommand,
    Tier,
    TrafficEvent,
    can_transition,
    decode_message,
    encode_message,
)
from snapscale.shared.bus.spec import DeploymentSpec, ScalingSpec, load_spec
from snapscale.shared.bus.subjects import Bucket, Verb, check_token, replica_key

__all__ = [
    "Bucket",
    "Bus",
    "CatalogEntry",
    "CheckpointEvent",
    "DeploymentSpec",
    "FreezeCommand",
    "GpuInfo",
    "Handler",
    "HostHeartbeat",
    "Ledger",
    "M",
    "PrefetchCommand",
    "ReleaseCommand",
    "ReleaseMode",
    "ReplicaEvent",
    "ReplicaState",
    "ReplicaSummary",
    "ScaleUpCommand",
    "ScalingSpec",
    "Tier",
    "TrafficEvent",
    "Verb",
    "can_transition",
    "check_token",
    "connect",
    "consume",
    "decode_entry",
    "decode_message",
    "encode_message",
    "ensure_topology",
    "kv_cas",
    "kv_get",
    "list_entries",
    "load_spec",
    "lookup_entry",
    "open_bus",
    "publish",
    "publish_core",
    "publish_entry",
    "replica_key",
    "subscribe_core",
    "through_elections",
]
