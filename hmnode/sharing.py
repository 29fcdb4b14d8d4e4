"""What this node shares, when and at what price: the contributor's [share] and [price]
config applied live. Every SHARE_CHECK_S it reads the machine (`ShareSensors`), asks the
rules (`SharePolicy`), and when the answer changes it says so once in the log, suspends or
resumes the jobs running here, re-advertises, and lets the chain service commit the offer
again (paused, with why: nothing is placed here meanwhile). Jobs suspended past the grace
period go back to the mesh (`job.release`, with the reason)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hmnode.config import Config
from hmnode.hardware import GpuInfo, Inventory
from hmnode.identity import NodeId
from hmnode.share_policy import ShareDecision, SharePolicy, ShareRules
from hmnode.share_sensors import ShareSensors

log = logging.getLogger(__name__)

SHARE_CHECK_S = 5.0
OFFER_BLOCKS = 1_000_000  # how long an offer stands (it is renewed when half of that is gone)
LOAD_STEPS = 4  # the load that moves dynamic prices, in quarters: prices change rarely
OFF = ShareDecision(False, ("sharing is off (share.enabled = false)",), ("sharing is off",))


def rules_from(config: Config, disk_total: int = 0) -> ShareRules:
    """The share rules the config sets."""
    return ShareRules(
        windows=config.share_windows, idle_only=config.share_idle_only,
        idle_minutes=config.share_idle_minutes, idle_cpu_percent=config.share_idle_cpu_percent,
        pause_on_battery=config.share_pause_on_battery,
        max_cpu_temp_c=config.share_max_cpu_temp_c or None,
        max_gpu_temp_c=config.share_max_gpu_temp_c or None,
        keep_free_disk_bytes=config.share_keep_free_disk.of(disk_total))


def shared_gpus(config: Config, gpus: tuple[GpuInfo, ...]) -> tuple[GpuInfo, ...]:
    """The GPUs the contributor shares."""
    if config.share_gpus == "none":
        return ()
    if config.share_gpus == "all":
        return gpus
    return tuple(g for g in gpus if g.index in config.share_gpus)


def prices(config: Config, load: float, models: tuple[str, ...] = ()) -> dict[str, int]:
    """The offer's prices: the configured ones, moved by the dynamic factor from (1 - d)
    when this node is idle to (1 + d) when it is full, never below the floor. A GPU-hour is
    the price of the dearest model offered (an offer has one GPU price)."""
    step = round(min(1.0, max(0.0, load)) * LOAD_STEPS) / LOAD_STEPS
    factor = max(config.price_floor, 1.0 + config.price_dynamic * (2 * step - 1))
    by_model = dict(config.price_gpu_models)
    gpu_hour = max((by_model.get(m, config.price_gpu_hour) for m in models),
                   default=config.price_gpu_hour)
    return {"core_hour": round(config.price_core_hour * factor),
            "gib_hour": round(config.price_gib_hour * factor),
            "gpu_hour": round(gpu_hour * factor),
            "start_fee": round(config.price_start_fee * factor)}


def offer_for(config: Config, inventory: Inventory | None, height: int,
              runtimes: tuple[str, ...], me: NodeId, paused: str | None = None,
              cores_in_use: int = 0) -> dict[str, Any] | None:
    """The offer this node keeps on the chain (None until it has measured itself);
    `cores_in_use` by its running jobs move dynamic prices."""
    if inventory is None:
        return None
    offer: dict[str, Any] = {
        "cores": max(1, min(inventory.cpu.logical_cores,
                            config.share_cores.of(inventory.cpu.logical_cores))),
        "memory_mib": max(64, min(inventory.memory.total_bytes,
                                  config.share_memory.of(inventory.memory.total_bytes)) >> 20),
        "runtimes": list(runtimes), "expires_height": height + OFFER_BLOCKS}
    gpus = shared_gpus(config, inventory.gpu.gpus) if "process" in runtimes else ()
    if gpus:  # only process jobs can use a GPU
        offer["gpus"] = [[m, n] for m, n in sorted(Counter(g.name for g in gpus).items())]
    offer["price"] = prices(config, cores_in_use / offer["cores"],
                            tuple(m for m, _ in offer.get("gpus", [])))
    if paused is not None:
        offer["paused"] = paused[:200]
    if config.share_allow == "owner":
        offer["allow"] = [me.key]
    elif config.share_allow != "everyone":
        offer["allow"] = [n.key for n in config.share_allow]
    return offer


class ShareMonitor:
    """The share rules applied to this machine, live."""

    def __init__(self, config: Config, data_dir: Path, me: NodeId,
                 inventory: Callable[[], Inventory | None], executor: Any,
                 on_change: Callable[[], None], offered: Callable[[], bool] = lambda: False,
                 sensors: ShareSensors | None = None) -> None:
        self.config = config
        self.data_dir = data_dir
        self.me = me
        self.inventory = inventory
        self.executor = executor  # JobExecutor: suspend, resume, give_back, cores_in_use
        self.on_change = on_change
        self.offered = offered  # whether this node has an offer on the chain
        self.sensors = sensors or ShareSensors(data_dir)
        self.policy = SharePolicy(self._rules())
        self.decision = ShareDecision(True)
        self.checked = False  # whether the machine has been read yet
        self._paused_at: float | None = None
        self._given_back = False
        self._switched_off = False

    def _rules(self) -> ShareRules:
        inventory = self.inventory()
        return rules_from(self.config, inventory.disk.total_bytes if inventory else 0)

    def reload(self, config: Config) -> None:
        """Apply a changed config now (`hmnode share` sets it while the node runs)."""
        # Sharing switched off while this node keeps an offer: the offer stays, paused, so
        # what runs on it keeps its place and nothing new comes.
        self._switched_off = self.config.share_enabled and not config.share_enabled
        self.config = config
        self.policy = SharePolicy(self._rules())
        log.info("share settings changed", extra={"event": "share_settings"})
        self.on_change()

    async def run(self) -> None:
        """Check the rules every SHARE_CHECK_S until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(SHARE_CHECK_S)

    async def check(self) -> None:
        """Read the machine and act on what the rules say now."""
        if self.config.share_enabled:
            readings = await asyncio.to_thread(self.sensors.read)
            self.apply(self.policy.decide(readings), time.monotonic())

    def apply(self, decision: ShareDecision, now: float) -> None:
        """Act on a decision: said once when it changes; jobs suspended, resumed or, past the
        grace period, given back."""
        before, self.decision, self.checked = self.decision, decision, True
        # Said (and offered) again only when the causes change, not the figures in them.
        if decision.sharing != before.sharing or decision.causes != before.causes:
            if decision.sharing:
                log.info("sharing resumed", extra={"event": "share_resumed"})
                self._paused_at, self._given_back = None, False
                self.executor.resume()
            else:
                log.info("sharing paused: %s", decision.reason,
                         extra={"event": "share_paused", "reason": decision.reason})
                if self._paused_at is None:
                    self._paused_at = now
                    self.executor.suspend()
            self.on_change()
        if (self._paused_at is not None and not self._given_back
                and now - self._paused_at >= self.config.share_grace_s):
            self._given_back = True
            self.executor.give_back(f"paused sharing: {decision.cause}")

    @property
    def enabled(self) -> bool:
        return self.config.share_enabled

    def offer(self, height: int, runtimes: tuple[str, ...]) -> dict[str, Any] | None:
        """The offer to keep on the chain now: None before the machine has been measured, or
        while sharing is off in the config (an offer committed by hand is then left as it is;
        one this node kept when sharing was switched off stays, paused)."""
        if not self.config.share_enabled:
            if not (self._switched_off and self.offered()):
                return None
            paused: str | None = OFF.cause
        elif not self.checked:
            return None
        else:
            paused = None if self.decision.sharing else self.decision.cause
        return offer_for(self.config, self.inventory(), height, runtimes, self.me, paused,
                         self.executor.cores_in_use())

    def describe(self, runtimes: tuple[str, ...]) -> dict[str, Any]:
        """What this node shares now, for its advert and `hmnode status`."""
        if not self.config.share_enabled:
            return {"sharing": False, "why_not": list(OFF.reasons)}
        offer = offer_for(self.config, self.inventory(), 0, runtimes, self.me)
        out: dict[str, Any] = {"sharing": self.decision.sharing,
                               "why_not": list(self.decision.reasons)}
        if offer is not None:
            out.update(cores=offer["cores"], memory_mib=offer["memory_mib"],
                       runtimes=offer["runtimes"], price=offer["price"],
                       gpus=offer.get("gpus", []),
                       allow="everyone" if "allow" not in offer else
                       [str(NodeId(n)) for n in offer["allow"]])
        return out

