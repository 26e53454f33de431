"""Every NATS subject, stream and KV bucket name snapscale uses, built in one place.

A namespace other than "snapscale" prefixes all of them, so tests (and tenants) stay apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from snapscale.shared.core.limits import Token

NAME_MAX = 64  # a deployment, host or namespace: leaves room for a replica id made from it
ID_MAX = 128  # a replica, command or checkpoint id, a GPU UUID, a compat hash

# What a field that names something on the bus is declared as: the decoder refuses anything else.
Name = Annotated[str, Token(NAME_MAX)]  # deployment, host
Id = Annotated[str, Token(ID_MAX)]  # replica, command id, checkpoint id, GPU UUID, compat hash
OptId = Annotated[str, Token(ID_MAX, empty=True)]  # an id field that may name nothing ("")


class Verb(StrEnum):
    SCALE_UP = "scale-up"
    RELEASE = "release"
    PREFETCH = "prefetch"
    FREEZE = "freeze"


class Bucket(StrEnum):
    DEPLOYMENTS = "deployments"
    CHECKPOINTS = "checkpoints"
    REPLICAS = "replicas"
    HOSTS = "hosts"
    LEASES = "leases"


def check_token(kind: str, value: str, max_len: int = NAME_MAX) -> str:
    """A deployment, host or replica id must be one subject token (no dots, spaces or wildcards),
    bounded: the rule the decoder applies to `Name` and `Id` fields, for values from elsewhere."""
    why = Token(max_len).problem(value)
    if why is not None:
        raise ValueError(f"{kind}: {why}")
    return value


@dataclass(frozen=True)
class Subjects:
    root: str = "snapscale"

    def __post_init__(self) -> None:
        check_token("namespace", self.root)

    # --- subjects -------------------------------------------------------------
    def traffic(self, deployment: str) -> str:
        return f"{self.root}.traffic.{check_token('deployment', deployment)}"

    def traffic_all(self) -> str:
        return f"{self.root}.traffic.*"

    def cmd(self, verb: Verb, host: str) -> str:
        return f"{self.root}.cmd.{verb.value}.{check_token('host', host)}"

    def cmd_all(self) -> str:
        return f"{self.root}.cmd.>"

    def evt_replica(self, deployment: str) -> str:
        return f"{self.root}.evt.replica.{check_token('deployment', deployment)}"

    def evt_replica_all(self) -> str:
        return f"{self.root}.evt.replica.*"

    def evt_checkpoint(self, deployment: str) -> str:
        return f"{self.root}.evt.checkpoint.{check_token('deployment', deployment)}"

    def evt_checkpoint_all(self) -> str:
        return f"{self.root}.evt.checkpoint.*"

    def evt_host(self, host: str) -> str:
        return f"{self.root}.evt.host.{check_token('host', host)}"

    def evt_host_all(self) -> str:
        return f"{self.root}.evt.host.*"

    # --- JetStream streams and KV buckets ---------------------------------------
    @property
    def _prefix(self) -> str:
        return "" if self.root == "snapscale" else f"{self.root}_"

    @property
    def cmd_stream(self) -> str:
        return f"{self.root.upper()}_CMD"

    @property
    def evt_stream(self) -> str:
        return f"{self.root.upper()}_EVT"

    def bucket(self, b: Bucket) -> str:
        return f"{self._prefix}{b.value}"

    def durable(self, service: str, verb: Verb, host: str) -> str:
        return f"{service}-{verb.value}-{check_token('host', host)}"


def replica_key(deployment: str, replica: str) -> str:
    """A replica's key in KV `replicas` (and the scaler's view of it): `<deployment>.<replica>`."""
    return f"{deployment}.{replica}"
