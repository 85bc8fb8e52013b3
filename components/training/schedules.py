"""Learning-rate schedules: the base multiplier of every stage's learning rate, by step
(``lr_schedule`` in a config; each stage scales it by its ``lr_scale``)."""

import logging
import math
from typing import Callable

log = logging.getLogger(__name__)


def linear_warmup_decay(total_steps: int, warmup_steps: int = 0, final_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from 0 over ``warmup_steps``, then linear decay to
    ``final_ratio`` at ``total_steps`` (BERT's and MiniALBERT's schedule)."""
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"Need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
    if warmup_steps >= total_steps:
        shorter = total_steps // 10
        log.warning(
            "lr_schedule.warmup_steps=%d is not below the run's %d steps (the learning rate would "
            "never peak): warming up over %d steps instead",
            warmup_steps,
            total_steps,
            shorter,
        )
        warmup_steps = shorter

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(total_steps - warmup_steps, 1)
        progress = min((step - warmup_steps) / remaining, 1.0)
        return final_ratio + (1.0 - final_ratio) * (1.0 - progress)

    return multiplier


def cosine_warmup_decay(total_steps: int, warmup_steps: int = 0, final_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then half a cosine down to ``final_ratio``."""
    linear = linear_warmup_decay(total_steps, warmup_steps, 0.0)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return linear(step)
        progress = 1.0 - linear(step)
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier
