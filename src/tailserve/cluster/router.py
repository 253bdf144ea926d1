"""Ray Serve's request router for the replicas, as an adapter over routing/'s policy: prefix/session
affinity bounded by load (`Chooser`), the same rule the gateway applies to its backends.

A replica's load is the requests this router has in flight on it (counted when chosen, moved if Ray
sends it elsewhere, uncounted on completion whatever the outcome) plus whatever of the queue the
replica reports (`record_routing_stats`, every `stats_period` seconds) goes beyond those: other
routers' requests (`Backend.load`). The router returns every replica ranked, one
per rank, so when its pick turns out full (Ray's `max_ongoing_requests`) Ray goes down the list
rather than waiting on the pick.

A call may be pinned to one replica (`pin=`): the ingress uses it to scrape every replica's metrics.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from tailserve.routing.backends import Backend
from tailserve.routing.chooser import Chooser

log = logging.getLogger("tailserve.cluster")
UNCONFIRMED_HOLD = 5.0  # seconds a choice stays counted without Ray confirming the send
# The routers of this process by (app, deployment), so the ingress can list the replicas it routes to.
LIVE: dict[tuple[str, str], AffinityRouter] = {}


def replica_name(replica_id: ReplicaID) -> str:
    return replica_id.unique_id


class AffinityRouter(RequestRouter):
    """Routes `EngineReplica.forward` calls by their `key` (affinity); other calls may be pinned."""

    def initialize_state(self, load_factor: float = 1.25, **kwargs: Any) -> None:
        self.load_factor = load_factor
        self._backends: dict[str, Backend] = {}
        self._chooser: Chooser | None = None
        # Request id → (replica it is counted on, whether Ray confirmed it went there, when counted).
        self._held: dict[str, tuple[str, bool, float]] = {}
        dep = self._deployment_id
        # Ray may have unpickled this class by value: the module imported by name is the process's own.
        from tailserve.cluster import router

        router.LIVE[(dep.app_name, dep.name)] = self
        log.info("affinity router for %s/%s (load factor %g)", dep.app_name, dep.name, load_factor)

    def replica_names(self) -> list[str]:
        """The replicas this router may send to now (read from the ingress's own thread)."""
        return [replica_name(r) for r in list(self.curr_replicas)]

    def _sync(self, replicas: list[RunningReplica]) -> Chooser:
        """Backends for the current replicas (keeping the in-flight counts of those that stay), updated
        with what each last reported."""
        names = [replica_name(r.replica_id) for r in replicas]
        if self._chooser is None or set(names) != set(self._backends):
            self._backends = {n: self._backends.get(n) or Backend.make(n) for n in names}
            self._chooser = Chooser(list(self._backends.values()), self.load_factor)
        now = time.monotonic()
        for rid, (_, routed, since) in list(self._held.items()):
            if not routed and now - since > UNCONFIRMED_HOLD:  # chosen, then never sent (cancelled)
                self._release(rid)
        for name, r in zip(names, replicas):
            b = self._backends[name]
            b.max_concurrency = r.max_ongoing_requests
            stats = r.routing_stats or {}
            b.report(waiting=stats.get("waiting"), ttft=stats.get("ttft"))
        return self._chooser

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all full: back off, do not spin
        by_name = {replica_name(r.replica_id): r for r in candidate_replicas}
        pin = kwargs.get("pin")
        if pin is not None:
            return [[by_name[pin]]] if pin in by_name else []
        chooser = self._sync(list(self.curr_replicas.values()))
        ranked = chooser.rank(kwargs.get("key"), time.monotonic())
        if ranked and pending_request is not None:
            # Counted at once, not when Ray has sent it: requests routed meanwhile must see it.
            self._hold(pending_request.metadata.internal_request_id, ranked[0].name, routed=False)
        ranks = [[by_name[b.name]] for b in ranked if b.name in by_name]
        return ranks or [candidate_replicas]

    def _hold(self, request_id: str, name: str, routed: bool) -> None:
        """Count `request_id` on replica `name` (moving it if it was counted elsewhere)."""
        self._release(request_id)
        b = self._backends.get(name)
        if b is not None:
            b.in_flight += 1
            self._held[request_id] = (name, routed, time.monotonic())

    def _release(self, request_id: str) -> None:
        held = self._held.pop(request_id, None)
        if held is not None and held[0] in self._backends:
            b = self._backends[held[0]]
            b.in_flight = max(0, b.in_flight - 1)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self._hold(pending_request.metadata.internal_request_id, replica_name(replica_id), routed=True)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._release(internal_request_id)
