"""The verdict rule and the read-out of speed at a quality bound, on hand-made results."""

from __future__ import annotations

import pytest

from adadepth.studies.protocol import (
    CONTRADICTED,
    JOINT,
    NOISE,
    REPRODUCED,
    RULE,
    Point,
    at_quality,
    figures,
    joint,
    judged,
    margin,
    stated,
    verdict,
)


def test_the_verdict_rule() -> None:
    assert verdict([0.010, 0.012, 0.011]) == REPRODUCED  # all agree, far beyond 2 SE
    # every seed agrees, but the mean is within two standard errors (the ponder report's
    # "one shared gate is unstable" margins): not reproduced
    mean, se = margin([0.0003, 0.0049, 0.0014])
    assert mean < 2 * se and verdict([0.0003, 0.0049, 0.0014]) == NOISE
    assert verdict([0.001, 0.030, 0.001]) == NOISE  # agree in sign, mean < 2 SE
    assert verdict([0.010, -0.001, 0.012]) == NOISE  # one seed disagrees
    assert verdict([-0.010, -0.012, -0.011]) == CONTRADICTED
    assert verdict([0.5]) == NOISE  # one seed is never beyond noise
    assert verdict([0.01, None, 0.011, 0.012]) == REPRODUCED  # missing seeds are left out


def test_speed_at_quality_from_a_hand_made_frontier() -> None:
    dense = 2.0
    frontier = [Point(0.25, 2.30, 2.0), Point(0.5, 2.08, 1.6), Point(0.75, 2.01, 1.2),
                Point(1.0, 2.00, 1.0)]
    exact = at_quality(frontier, dense, 0.04)  # 2.08 is exactly the +4 % bound
    assert exact.how == "measured" and exact.speed == pytest.approx(1.6)
    # +2 %: 2.04 lies between 2.01 (1.2x) and 2.08 (1.6x): 3/7 of the way
    bracketed = at_quality(frontier, dense, 0.02)
    assert bracketed.how == "interpolated"
    assert bracketed.speed == pytest.approx(1.2 + 3 / 7 * 0.4)
    assert at_quality(frontier, dense, -0.01).how == "not reached"  # nothing is better
    assert at_quality(frontier[:2], dense, 0.01).how == "not reached"  # no point within
    # within the bound everywhere: the fastest point, measured, never extrapolated
    assert at_quality(frontier, dense, 0.5).speed == pytest.approx(2.0)


def test_a_finding_of_several_parts_and_its_figures() -> None:
    assert joint([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert joint([REPRODUCED, NOISE]) == NOISE  # every part must be reproduced
    assert joint([REPRODUCED, CONTRADICTED]) == CONTRADICTED  # one false part is enough
    assert joint([]) == NOISE
    assert figures([0.0004, 0.0006, 0.0066], unit=" nats") == (
        "+0.0004, +0.0006, +0.0066 nats (mean +0.0025 ± 0.0020 SE)")
    assert figures([0.5]) == "+0.5000 (one seed)" and figures([None]) == "no seed"
    assert judged([0.010, 0.012, 0.011]).endswith(": **reproduced**")
    assert RULE in stated() and JOINT in stated()
