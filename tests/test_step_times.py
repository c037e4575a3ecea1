"""The scheduler's timing of its steps (decoders/scheduler.py StepTimes): what a step without
guided rows takes, and what a guide token adds, from the steps it sees."""

from __future__ import annotations

import numpy as np

from alignd.decoders.scheduler import StepTimes


def steps(rng, n: int, plain: float, per_guide_token: float, sizes=(0, 20, 40, 60)):
    """Synthetic steps with plain rows: guide tokens of one of `sizes` (rows taking turns),
    an odd prefill (a tenth longer), and noise of a tenth of the step."""
    for _ in range(n):
        guide = int(rng.choice(sizes))
        seconds = plain * (1.1 if rng.random() < 0.05 else 1.0) + per_guide_token * guide
        yield guide, seconds * (1 + 0.1 * rng.standard_normal())


def test_fit_recovers_a_guide_tokens_cost_and_the_step_without_guides():
    rng = np.random.default_rng(0)
    times = StepTimes(memory=64)
    for guide, seconds in steps(rng, 400, plain=0.3, per_guide_token=0.018):
        times.add(guide, seconds)
    plain, per_guide_token = times.fit()
    # Against the true values, by an independent mean: steps without guides, and the rest's excess.
    assert abs(plain - 0.3) < 0.03
    assert abs(per_guide_token - 0.018) < 0.0036


def test_fit_follows_a_change_in_cost():
    rng = np.random.default_rng(1)
    times = StepTimes(memory=64)
    for guide, seconds in steps(rng, 300, plain=0.3, per_guide_token=0.018):
        times.add(guide, seconds)
    # A costlier guide mix arrives (rollouts, say): the older steps fade.
    for guide, seconds in steps(rng, 400, plain=0.3, per_guide_token=0.06):
        times.add(guide, seconds)
    assert abs(times.fit()[1] - 0.06) < 0.012


def test_no_fit_until_steps_without_guides_were_seen():
    """Guided steps alone cannot say what the guides cost (a text reward's time per call, not
    per token, fooled a regression over guided steps of different sizes): a step without guided
    rows is needed, and `since_plain` tells the scheduler when to hold one (a probe)."""
    times = StepTimes(memory=64)
    assert times.fit() is None
    for i in range(40):
        times.add(2 + 3 * (i % 2), 0.055)
    assert times.fit() is None and times.since_plain == 40
    times.add(0, 0.004)
    plain, per_guide_token = times.fit()
    assert times.since_plain == 0 and plain == 0.004
    assert abs(per_guide_token - (0.055 - 0.004) / 3.5) < 1e-3  # the guided steps' mean size: 3.5
