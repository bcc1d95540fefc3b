"""Time the harness waits on, injectable so a test of a timeout owns its clock.

A deadline test on the wall clock is a test of the machine's speed: under load a
correct run misses it. The distributed coordinator's join wait and run deadline read
`clock.now()` and pause with `clock.sleep()`. A test passes a `SimulatedClock`, on
which time passes only while the code under test waits (a 20 s timeout expires after
20 s of its waiting and no real seconds), or a `ManualClock`, on which time passes
only when the test says (say, 4 s a round): the way TigerBeetle's VOPR and
FoundationDB's simulator own time."""
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Clock:
    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


WALL = Clock()


class SimulatedClock:
    """A clock that moves only when slept on."""

    def __init__(self, start: float = 0.0):
        self.time = start

    def now(self) -> float:
        return self.time

    def sleep(self, seconds: float) -> None:
        self.time += seconds


class ManualClock:
    """A clock the test moves (`advance`); waiting on it lets real time pass, for the real
    processes being waited for, but none of its own."""

    def __init__(self, start: float = 0.0):
        self.time = start

    def now(self) -> float:
        return self.time

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def advance(self, seconds: float) -> None:
        self.time += seconds
