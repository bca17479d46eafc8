"""Which of several gpuctld sharing one database leads: the leader lease and its epoch.

The leader claims a row of the store (holder, epoch, expiry by the database's clock) and
renews it every `renew_s`; a standby claims it every `retry_s` and gets it once it lapsed.
Safety does not rest on timing: every write a gpuctld makes carries its epoch and commits only
while that epoch is current (`Store.fence`), so a leader that paused or lost the network
writes nothing after a standby took over. Timing only decides how fast a standby takes over:
at most `ttl_s + retry_s` after the leader died (Kubernetes' leader election, with the fencing
tokens of Chubby and etcd).

A leader that cannot renew for `ttl_s`, or finds its epoch gone, stops leading for good: the
daemon then exits and its supervisor (systemd) starts it again, as a standby.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from gpuctl.core.errors import Unavailable
from gpuctl.store.base import Leadership, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ElectorSettings:
    name: str
    address: str
    agent_address: str
    ttl_s: float = 4.0
    renew_s: float = 1.0
    retry_s: float = 0.5

    def violations(self) -> list[str]:
        out = []
        if not self.name:
            out.append("ha.name must not be empty")
        if not 0 < self.renew_s < self.ttl_s / 2:
            out.append("ha.renew_interval_s must be above 0 and under half of ha.lease_ttl_s")
        if self.retry_s <= 0:
            out.append("ha.retry_interval_s must be above 0")
        return out


class Elector:
    """Claims, renews and gives up the lease; `tick` does one step and says when to call again.

    `on_lead(epoch)` runs once, when this gpuctld starts leading (the store is fenced at the
    epoch first); `on_lost(why)` once, when it stops (the store is fenced shut first).
    """

    def __init__(
        self,
        store: Store,
        settings: ElectorSettings,
        *,
        monotonic: Callable[[], float],
        on_lead: Callable[[int], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self._store = store
        self._s = settings
        self._monotonic = monotonic
        self._on_lead = on_lead
        self._on_lost = on_lost
        self.epoch = 0  # while leading
        self.lost = False
        self._renewed_at = 0.0
        self._seen: tuple[str, int] | None = None  # the leader last logged, as a standby

    @property
    def leading(self) -> bool:
        return self.epoch > 0 and not self.lost

    def tick(self) -> float:
        """One step; the seconds until the next (0 after losing: nothing more to do)."""
        if self.lost:
            return 0.0
        if self.epoch:
            return self._renew()
        return self._claim()

    def resign(self) -> None:
        """On a clean stop: let a standby take over now rather than after the lease's ttl."""
        if not self.leading:
            return
        self._store.fence(0)
        self.lost = True
        try:
            self._store.resign_leadership(self._s.name, self.epoch)
            log.info("resigned the leader lease (epoch %d)", self.epoch)
        except Unavailable as e:
            log.warning("could not resign the leader lease (%s): it lapses by itself", e)

    def _claim(self) -> float:
        try:
            held = self._store.claim_leadership(
                self._s.name,
                address=self._s.address,
                agent_address=self._s.agent_address,
                ttl_s=self._s.ttl_s,
            )
        except Unavailable as e:
            log.warning("standby: cannot reach the store to claim the lease: %s", e)
            return self._s.retry_s
        if held.holder != self._s.name:
            self._log_standby(held)
            return self._s.retry_s
        self.epoch = held.epoch
        self._renewed_at = self._monotonic()
        self._store.fence(self.epoch)
        log.info("leading (epoch %d) as %s", self.epoch, self._s.name)
        try:
            self._on_lead(self.epoch)
        except Exception as e:  # a provider that cannot be built, say: lead no further
            log.exception("could not start leading")
            lost = self._lose(f"could not start leading: {e}")
            with contextlib.suppress(Unavailable):  # else it lapses by itself
                self._store.resign_leadership(self._s.name, self.epoch)
            return lost
        return self._s.renew_s

    def _renew(self) -> float:
        try:
            kept = self._store.renew_leadership(self._s.name, self.epoch, self._s.ttl_s)
        except Unavailable as e:
            silent = self._monotonic() - self._renewed_at
            if silent < self._s.ttl_s:
                log.warning("cannot renew the leader lease (%.1fs without): %s", silent, e)
                return self._s.renew_s
            return self._lose(f"the store was unreachable for {silent:.1f}s: {e}")
        if not kept:
            return self._lose("another gpuctld claimed the lease")
        self._renewed_at = self._monotonic()
        return self._s.renew_s

    def _lose(self, why: str) -> float:
        self._store.fence(0)
        self.lost = True
        log.error("no longer the leader (epoch %d): %s", self.epoch, why)
        self._on_lost(why)
        return 0.0

    def _log_standby(self, held: Leadership) -> None:
        seen = (held.holder, held.epoch)
        if seen != self._seen:
            self._seen = seen
            log.info(
                "standby: %s leads (epoch %d) at %s; taking over if its lease lapses",
                held.holder,
                held.epoch,
                held.address or "-",
            )


def run(elector: Elector, stop: threading.Event) -> None:
    """The elector's thread: tick until stopped or the lease is lost."""
    while not stop.is_set():
        delay = elector.tick()
        if elector.lost or stop.wait(delay):
            return
