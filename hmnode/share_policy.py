"""When a contributor's machine shares, and how much: the contributor's rules applied to what
the machine reads now. Sans-IO: readings in (`Readings`, taken by `hmnode.share_sensors`), a
decision out (`ShareDecision`), with the little memory the rules need (how long the machine
has been idle, whether it is still cooling down).

Rules, as BOINC's users know them plus what they asked for: time windows ("Mon-Fri
18:00-08:00"), idle-only (no user input and no other CPU load above a threshold for N minutes;
BOINC's defaults are 3 minutes and 25%), pause on battery, pause above a CPU or GPU
temperature (resumed 5 degrees below it), and disk to keep free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
COOL_DOWN_C = 5.0  # a node paused for heat resumes this far below its limit
_WINDOW = re.compile(r"^\s*(?:(?P<days>[A-Za-z]{3}(?:\s*[-,]\s*[A-Za-z]{3})*)\s+)?"
                     r"(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$"
                     r"|^\s*(?P<only_days>[A-Za-z]{3}(?:\s*[-,]\s*[A-Za-z]{3})*)\s*$")


@dataclass(frozen=True)
class TimeWindow:
    """Days of the week and a time of day when the machine may share. A window that ends
    before it starts runs past midnight into the next day ("Mon-Fri 18:00-08:00" includes
    Saturday 07:00)."""

    days: frozenset[int]  # 0 is Monday
    start_min: int
    end_min: int  # 1440 is midnight at the end of the day
    text: str

    @classmethod
    def parse(cls, text: str) -> TimeWindow:
        """"Mon-Fri 18:00-08:00", "Sat,Sun", "22:00-06:00" (every day); ValueError saying
        the expected form."""
        match = _WINDOW.match(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"expected a window such as 'Mon-Fri 18:00-08:00', 'Sat,Sun' or "
                             f"'22:00-06:00', got {text!r}")
        days_text = match["days"] or match["only_days"]
        days = _days(days_text) if days_text else frozenset(range(7))
        if match["only_days"]:
            return cls(days, 0, 1440, text.strip())
        start, end = _minutes(match["start"]), _minutes(match["end"])
        if start == end:
            raise ValueError(f"a window starts and ends at different times, not {text!r}")
        return cls(days, start, end, text.strip())

    def contains(self, when: datetime) -> bool:
        """Whether local time `when` falls in the window."""
        day, minute = when.weekday(), when.hour * 60 + when.minute
        if self.start_min < self.end_min:
            return day in self.days and self.start_min <= minute < self.end_min
        # Past midnight: the evening of a listed day, or the morning after one.
        return (day in self.days and minute >= self.start_min) or \
            ((day - 1) % 7 in self.days and minute < self.end_min)


def _days(text: str) -> frozenset[int]:
    days: set[int] = set()
    for part in re.split(r"\s*,\s*", text.strip().lower()):
        first, _, last = part.partition("-")
        first, last = first.strip(), (last.strip() or first.strip())
        if first not in DAYS or last not in DAYS:
            raise ValueError(f"days are Mon, Tue, Wed, Thu, Fri, Sat, Sun, not {part!r}")
        i, j = DAYS.index(first), DAYS.index(last)
        days.update(range(i, j + 1) if i <= j else [*range(i, 7), *range(0, j + 1)])
    return frozenset(days)


def _minutes(text: str) -> int:
    hours, minutes = (int(x) for x in text.split(":"))
    if not (0 <= hours <= 24 and 0 <= minutes < 60) or hours * 60 + minutes > 1440:
        raise ValueError(f"a time of day is 00:00 to 24:00, not {text!r}")
    return hours * 60 + minutes


@dataclass(frozen=True)
class ShareRules:
    """The contributor's rules for when to share (from the config's [share] section)."""

    windows: tuple[TimeWindow, ...] = ()  # none: at any time
    idle_only: bool = False
    idle_minutes: float = 3.0
    idle_cpu_percent: float = 25.0
    pause_on_battery: bool = True
    max_cpu_temp_c: float | None = 90.0  # None: no limit
    max_gpu_temp_c: float | None = 85.0
    keep_free_disk_bytes: int = 0


@dataclass(frozen=True)
class Readings:
    """What the machine says now. None: the machine cannot tell (no battery, no sensor, no
    input device), which no rule holds against it."""

    now: datetime  # local wall time, for the windows
    monotonic: float  # for how long things have lasted
    on_battery: bool | None = None
    cpu_temp_c: float | None = None
    gpu_temps_c: tuple[float, ...] = ()
    input_idle_s: float | None = None  # since the last keyboard, mouse or terminal input
    other_cpu_percent: float | None = None  # of all cores, by programs other than the node's
    disk_free_bytes: int | None = None


@dataclass(frozen=True)
class ShareDecision:
    """Whether the machine shares now, and if not, every reason why: `reasons` in detail (for
    people: they change with each reading), `causes` in a word or three each (stable while
    the same rules hold: what the offer and the log say)."""

    sharing: bool
    reasons: tuple[str, ...] = ()
    causes: tuple[str, ...] = ()

    @property
    def reason(self) -> str | None:
        return "; ".join(self.reasons) if self.reasons else None

    @property
    def cause(self) -> str | None:
        return "; ".join(self.causes) if self.causes else None


class SharePolicy:
    """Applies `ShareRules` to a sequence of readings."""

    def __init__(self, rules: ShareRules) -> None:
        self.rules = rules
        self._busy_at: float | None = None  # when other programs last loaded the CPU
        self._hot: set[str] = set()  # sensors over their limit, until they cool down

    def decide(self, r: Readings) -> ShareDecision:
        """The decision for readings `r` (taken in order: the idle rule remembers)."""
        rules, found = self.rules, []
        if rules.windows and not any(w.contains(r.now) for w in rules.windows):
            found.append(("outside its time window",
                          f"outside its time window{'s' if len(rules.windows) > 1 else ''} "
                          f"({', '.join(w.text for w in rules.windows)})"))
        if rules.idle_only:
            found.extend(("in use", text) for text in self._not_idle(r))
        if rules.pause_on_battery and r.on_battery:
            found.append(("on battery", "on battery"))
        found.extend(("too hot", text) for text in self._too_hot(r))
        if r.disk_free_bytes is not None and r.disk_free_bytes < rules.keep_free_disk_bytes:
            found.append(("short of disk", f"only {_gib(r.disk_free_bytes)} of disk free (it "
                                           f"keeps {_gib(rules.keep_free_disk_bytes)} free)"))
        causes = tuple(dict.fromkeys(cause for cause, _ in found))
        return ShareDecision(not found, tuple(text for _, text in found), causes)

    def _not_idle(self, r: Readings) -> list[str]:
        rules, need_s = self.rules, self.rules.idle_minutes * 60
        reasons = []
        if r.input_idle_s is not None and r.input_idle_s < need_s:
            reasons.append(f"in use (input {_duration(r.input_idle_s)} ago; idle-only waits "
                           f"{rules.idle_minutes:g} min)")
        if r.other_cpu_percent is not None and r.other_cpu_percent > rules.idle_cpu_percent:
            self._busy_at = r.monotonic
            reasons.append(f"other programs use {r.other_cpu_percent:.0f}% of the CPU "
                           f"(idle-only allows {rules.idle_cpu_percent:g}%)")
        elif self._busy_at is not None and r.monotonic - self._busy_at < need_s:
            reasons.append(f"other programs used the CPU {_duration(r.monotonic - self._busy_at)}"
                           f" ago (idle-only waits {rules.idle_minutes:g} min)")
        return reasons

    def _too_hot(self, r: Readings) -> list[str]:
        sensors = [("the CPU", r.cpu_temp_c, self.rules.max_cpu_temp_c)]
        sensors += [(f"GPU {i}", t, self.rules.max_gpu_temp_c) for i, t in enumerate(r.gpu_temps_c)]
        reasons = []
        for name, temp, limit in sensors:
            if temp is None or limit is None:
                self._hot.discard(name)
                continue
            hot = temp > limit or (name in self._hot and temp > limit - COOL_DOWN_C)
            if hot:
                self._hot.add(name)
                cooling = "" if temp > limit else f", cooling to {limit - COOL_DOWN_C:g} °C"
                reasons.append(f"too hot: {name} is at {temp:.0f} °C (limit {limit:g} °C"
                               f"{cooling})")
            else:
                self._hot.discard(name)
        return reasons


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"
