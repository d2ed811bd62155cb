"""Connect to a Ray cluster, or start the embedded one: several real raylets on this machine, one per host.

Token authentication stays on (Ray 2.60's default): the embedded cluster generates a token and every node and
driver shares it through RAY_AUTH_TOKEN.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket

import ray

from herdsman import RAY_NAMESPACE, HerdsmanError


class LocalCluster:
    """A head node (no Herdsman host) plus `hosts` worker nodes labelled herdsman.host=<name>."""

    def __init__(self, hosts: list[str], cpus_per_host: int = 1):
        self.hosts, self.cpus_per_host = hosts, cpus_per_host
        self._cluster = None

    @property
    def address(self) -> str:
        assert self._cluster is not None
        return self._cluster.address

    def start(self) -> "LocalCluster":
        from ray.cluster_utils import Cluster

        enable_token_auth()
        # Quicker death detection of a lost node than the production default.
        system = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
        self._cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=1, include_dashboard=False, _system_config=system))
        self.node_ids = {}
        for h in self.hosts:
            node = self._cluster.add_node(num_cpus=self.cpus_per_host, resources={"herdsman_host": 1},
                                          labels={"herdsman.host": h})
            self.node_ids[h] = node.node_id
        self._cluster.wait_for_nodes()
        return self

    def remove_host(self, host: str) -> None:
        """Kill one host's raylet, as a machine that dies would (for tests)."""
        assert self._cluster is not None
        for node in list(self._cluster.worker_nodes):
            if node.node_id == self.node_ids[host]:
                self._cluster.remove_node(node, allow_graceful=False)

    def stop(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def enable_token_auth() -> None:
    """Token auth for this process and the nodes it starts; a token is generated if none is set.

    Ray reads the mode when it is imported, so the cached config is refreshed (as Ray's own test helpers do).
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def connect(address: str) -> None:
    """ray.init against an existing cluster, failing fast with one clear line when it cannot be reached."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise HerdsmanError(f"Ray address {address!r} is not of the form HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except OSError as e:
        raise HerdsmanError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None
    try:
        ray.init(address=address, namespace=RAY_NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
    except Exception as e:  # auth failures, version mismatches, ...
        raise HerdsmanError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}") from None


def discover_hosts() -> dict[str, str]:
    """Alive Ray nodes that are Herdsman hosts: host name (label herdsman.host, else node IP) -> node id."""
    out = {}
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        labels = n.get("Labels") or {}
        if "herdsman.host" in labels or n.get("Resources", {}).get("herdsman_host"):
            out[labels.get("herdsman.host") or n["NodeManagerAddress"]] = n["NodeID"]
    return out
