"""Learning-rate schedules: Psyche's four ([model.LLM.lr_schedule.<Name>]), with its formulas.

Each is Psyche's `get_lr(step)` (shared/core/src/definitions.rs) to the letter, quirks
included: Cosine is not clamped past total_steps (its cosine climbs back towards base_lr),
Linear and WarmupStableDecay hold their final rate. A run's round r is Psyche's step r.
Psyche's cold-start warmup (a factor on the first epoch's first steps) is `cold_start_factor`.
"""
import math
from dataclasses import dataclass, fields

from sim.errors import ConfigError


def _warmup(init: float, base: float, step: int, steps: int) -> float:
    return init + (base - init) * (step / steps)


@dataclass(frozen=True)
class ConstantSchedule:
    base_lr: float = 1e-3
    warmup_steps: int = 0
    warmup_init_lr: float = 0.0

    def __post_init__(self):
        _check(self)

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(self.warmup_init_lr, self.base_lr, step, self.warmup_steps)
        return self.base_lr


@dataclass(frozen=True)
class _Decaying:
    """The fields Linear and Cosine share: warm up, then decay to final_lr at total_steps."""
    base_lr: float = 1e-3
    warmup_steps: int = 0
    warmup_init_lr: float = 0.0
    total_steps: int = 100
    final_lr: float = 1e-4

    def __post_init__(self):
        _check(self)


@dataclass(frozen=True)
class LinearSchedule(_Decaying):
    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(self.warmup_init_lr, self.base_lr, step, self.warmup_steps)
        if step < self.total_steps:
            progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
            return self.base_lr + (self.final_lr - self.base_lr) * progress
        return self.final_lr


@dataclass(frozen=True)
class CosineSchedule(_Decaying):
    def __post_init__(self):
        super().__post_init__()
        if self.total_steps <= self.warmup_steps:   # Psyche divides by their difference
            raise ConfigError(f"lr_schedule.Cosine total_steps {self.total_steps} is invalid: expected more than "
                              f"warmup_steps {self.warmup_steps} (the cosine spans total_steps - warmup_steps)")

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(self.warmup_init_lr, self.base_lr, step, self.warmup_steps)
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.final_lr + (self.base_lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class WarmupStableDecaySchedule:
    base_lr: float = 1e-3
    warmup_steps: int = 0
    warmup_init_lr: float = 0.0
    stable_steps: int = 0
    cosine_decay_steps: int = 0
    cosine_decay_final_lr: float = 1e-4
    linear_decay_steps: int = 0
    linear_decay_final_lr: float = 0.0

    def __post_init__(self):
        _check(self)
        # Psyche asserts these on every get_lr: a run with them violated panics at its first step.
        if not self.linear_decay_final_lr <= self.cosine_decay_final_lr <= self.base_lr:
            raise ConfigError(f"lr_schedule.WarmupStableDecay needs linear_decay_final_lr <= cosine_decay_final_lr "
                              f"<= base_lr, got {self.linear_decay_final_lr}, {self.cosine_decay_final_lr}, "
                              f"{self.base_lr}")

    def lr(self, step: int) -> float:
        stable_end = self.warmup_steps + self.stable_steps
        cosine_end = stable_end + self.cosine_decay_steps
        if step < self.warmup_steps:
            return _warmup(self.warmup_init_lr, self.base_lr, step, self.warmup_steps)
        if step < stable_end:
            return self.base_lr
        if step < cosine_end:
            progress = (step - stable_end) / self.cosine_decay_steps
            return self.cosine_decay_final_lr + (self.base_lr - self.cosine_decay_final_lr) * 0.5 * (
                1.0 + math.cos(math.pi * progress))
        if step < cosine_end + self.linear_decay_steps:
            progress = (step - cosine_end) / self.linear_decay_steps
            return self.cosine_decay_final_lr - (self.cosine_decay_final_lr - self.linear_decay_final_lr) * progress
        return self.linear_decay_final_lr


# Psyche's enum variant names, as state.toml spells them.
SCHEDULES = {"Constant": ConstantSchedule, "Linear": LinearSchedule, "Cosine": CosineSchedule,
             "WarmupStableDecay": WarmupStableDecaySchedule}
Schedule = ConstantSchedule | LinearSchedule | CosineSchedule | WarmupStableDecaySchedule


def schedule_name(schedule: Schedule) -> str:
    return next(name for name, cls in SCHEDULES.items() if isinstance(schedule, cls))


def cold_start_factor(step: int, warmup_steps: int) -> float:
    """Psyche's cold-start warmup (model.LLM.cold_start_warmup_steps): in the run's first
    epoch, which starts at step 0, the schedule's rate times step / warmup_steps while
    step <= warmup_steps (Trainer::get_lr's warmup_lr_between); 1 otherwise."""
    if warmup_steps == 0 or step > warmup_steps:
        return 1.0
    return step / warmup_steps


def _check(schedule) -> None:
    name = schedule_name(schedule)
    for f in fields(schedule):
        value = getattr(schedule, f.name)
        if f.type is int or f.type == "int":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"lr_schedule.{name} {f.name} {value!r} is invalid: expected an integer >= 0")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"lr_schedule.{name} {f.name} {value!r} is invalid: expected a finite number >= 0")
