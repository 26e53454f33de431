"""The scale-down half of the simulation (Actor.scale_down's decisions): which replicas go and
how, the freeze before the last one goes, the budget on suspended replicas, the prefetch after.
"""

from __future__ import annotations

from collections.abc import Mapping

from snapscale.freezer.decide import Action, Claim, after_claim, before_claim, judge_claim
from snapscale.restorer.budget import Suspended as BudgetEntry
from snapscale.restorer.budget import over_budget
from snapscale.scaler.config import ScalerConfig
from snapscale.scaler.placement import Release, Reservations, choose_releases, needs_freeze, prefetch_targets
from snapscale.shared.bus import CatalogEntry, FreezeCommand, HostHeartbeat, ReleaseMode
from snapscale.simulate.fleet import COMPAT, Fleet, ReleaseBeats, Suspended
from snapscale.simulate.policies import Policy, Result
from snapscale.simulate.profile import Profile
from snapscale.simulate.state import FROZEN, PREFETCHED, Dep

CLAIM_TTL_S = 120.0  # FreezerConfig.claim_ttl_s
# nothing in flight: the simulator's commands land at once (the functions only read it, `place` copies)
NOTHING_RESERVED = Reservations()
_SUSPEND = ReleaseMode.SUSPEND  # a module constant: the class lookup is slow on Python 3.11


class Down:
    """Mixed into `Sim`, which owns these attributes and `push`."""

    deps: list[Dep]
    fleet: Fleet
    res: Result
    policy: Policy
    profile: Profile
    cfg: ScalerConfig
    ids: int
    sampled: dict[int, str]
    stop_only: bool

    def push(self, t: float, kind: int, d: int, what: str = "") -> None:
        raise NotImplementedError

    def _catalog(self, dep: Dep) -> dict[str, str]:
        return {COMPAT: dep.ckpt} if dep.ckpt else {}

    def _freeze(self, d: int, replica: str, host: str, t: float) -> None:
        """Ask the freezer (FreezeJob's decision): it freezes unless the catalog has a checkpoint
        or another freeze of the deployment holds the claim."""
        dep = self.deps[d]
        self.ids += 1
        cmd = FreezeCommand(id=f"fz-{self.ids}", deployment=dep.spec.name, replica=replica, issued_at=t)
        entry = None
        if dep.ckpt is not None:
            entry = CatalogEntry(dep.spec.name, COMPAT, dep.ckpt, "sim", 0.0, host)
        verdict = before_claim(cmd, done=False, catalog=entry)
        if verdict is None:
            verdict = after_claim(judge_claim(dep.claim, host=host, command_id=cmd.id, now=t), dep.claim)
            if verdict.action is Action.FREEZE:
                dep.claim = Claim(host, cmd.id, t + CLAIM_TTL_S)
                self.res.freezes += 1
                self.push(t + self.profile.freeze(dep.gib), FROZEN, d)

    # --- down ----------------------------------------------------------------------------------
    def _scale_down(self, d: int, n: int, t: float) -> None:
        """Actor.scale_down: release ready replicas; freeze before the last goes; prefetch after."""
        dep = self.deps[d]
        ready = [r.ev for r in dep.live.values() if r.ev is not None]
        # stop only: choose_releases reads only that a host reports, and nothing else runs
        hosts: Mapping[str, HostHeartbeat] = (
            self.fleet.reporting if self.stop_only else ReleaseBeats(self.fleet, dep.spec.name, t)
        )
        releases = choose_releases(dep.spec, min(n, len(ready)), ready, hosts, NOTHING_RESERVED)
        if not releases:
            return
        to_zero = len(dep.live) == len(releases)
        if to_zero and self.policy.freeze:
            last = releases[-1]
            if needs_freeze(hosts[last.host], dep.spec.name, self._catalog(dep)):
                if dep.freeze_deadline is None:
                    dep.freeze_deadline = t + self.cfg.freeze_timeout_s
                    dep.freeze_done = False
                    self._freeze(d, last.replica, last.host, t)
                    releases = releases[:-1]
                elif not dep.freeze_done and t < dep.freeze_deadline:
                    releases = releases[:-1]  # still freezing: the last one waits
            to_zero = len(dep.live) == len(releases)
        for r in releases:
            self._release(d, r, t)
        if to_zero and releases:
            dep.freeze_deadline = None
            self._prefetch(d, t)

    def _release(self, d: int, r: Release, t: float) -> None:
        dep = self.deps[d]
        rep = dep.live.pop(r.replica)
        self.res.gpu_s += (t - rep.start) * len(rep.gpus)
        fleet = self.fleet
        fleet.mark(fleet.by_name[rep.host], rep.gpus, False)
        if not self.stop_only:
            fleet.drop_ready(rep.host, dep.spec.name, r.replica)
        dep.n_ready -= 1
        if dep.n_ready == 0:
            dep.noready_since = t
        self._series(d, t)
        if r.mode is _SUSPEND:
            self.fleet.suspend(rep.host, r.replica, Suspended(dep.spec.name, t, dep.nbytes))
            host = self.fleet.by_name[rep.host]
            if host.suspended_bytes > self.fleet.budget:  # within it, over_budget stops none
                entries = [BudgetEntry(k, s.since, s.rss_bytes) for k, s in host.suspended.items()]
                for k in over_budget(entries, self.fleet.budget):
                    self.fleet.unsuspend(rep.host, k)

    def _prefetch(self, d: int, t: float) -> None:
        dep = self.deps[d]
        want = self.policy.prefetch_hosts
        if want <= 0 or dep.ckpt is None:
            return
        names = self.fleet.prefetch_candidates(dep.ckpt, want, dep.spec.gpus)
        hosts = {h: self.fleet.heartbeat(h, dep.spec.name, dep.ckpt, t) for h in names}
        for host, _ck in prefetch_targets(dep.spec, hosts, self._catalog(dep), NOTHING_RESERVED, want):
            self.res.prefetches += 1
            self.res.store_bytes += dep.nbytes
            self.push(t + self.profile.prefetch(dep.gib), PREFETCHED, d, host)

    def _series(self, d: int, t: float) -> None:
        name = self.sampled.get(d)
        if name is not None:
            self.res.series[name].append((t, len(self.deps[d].live)))
