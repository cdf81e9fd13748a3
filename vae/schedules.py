"""Step schedules of the dVAE's training: Gumbel-softmax temperature and KL weight, as pure functions.

DALL-E (Ramesh et al. 2021, appendix A.2) anneals the relaxation temperature from 1 to 1/16 and raises
the KL weight from 0 to its target with cosine schedules. The temperature is annealed along a cosine in
log space: it divides the logits, so halving it is the same-sized move at any temperature, and the plain
cosine would spend most of the run above 0.3 where samples are still far from one-hot.

    values = values_at(step, temperature_start=1.0, temperature_end=1 / 16, temperature_steps=5000,
                       kl_weight=1e-4, kl_warmup_steps=2000)
    loss, metrics = model(images, step, **values)
"""

from __future__ import annotations

import math


def cosine_progress(step: int, steps: int) -> float:
    """0 at step 0 rising to 1 at `steps` along half a cosine; 1 from then on (and when steps <= 0)."""
    if steps <= 0 or step >= steps:
        return 1.0
    return 0.5 * (1 - math.cos(math.pi * max(step, 0) / steps))


def temperature_at(step: int, start: float, end: float, steps: int) -> float:
    """Gumbel-softmax temperature: `start` at step 0, `end` at `steps` and after (cosine in log space)."""
    if start <= 0 or end <= 0:
        raise ValueError(f"temperatures must be positive, got start={start}, end={end}")
    t = cosine_progress(step, steps)
    return math.exp((1 - t) * math.log(start) + t * math.log(end))


def kl_weight_at(step: int, target: float, warmup_steps: int) -> float:
    """KL weight: 0 at step 0 rising to `target` at `warmup_steps` (cosine), `target` after."""
    return target * cosine_progress(step, warmup_steps)


def values_at(
    step: int,
    *,
    temperature_start: float,
    temperature_end: float,
    temperature_steps: int,
    kl_weight: float,
    kl_warmup_steps: int,
) -> dict[str, float]:
    """The keyword arguments of `DiscreteVAE.training_step_loss` at `step`, from the config's schedule fields."""
    return {
        "temperature": temperature_at(step, temperature_start, temperature_end, temperature_steps),
        "kl_weight": kl_weight_at(step, kl_weight, kl_warmup_steps),
    }
