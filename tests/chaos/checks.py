"""What every scenario asserts, shared by the scenario modules."""

from __future__ import annotations

from ..servers import unavailable
from .figures import Figures
from .scenario import ScenarioRig


class DoubleEffects(AssertionError):
    """Raised when some key's vendor effect was applied more than once."""


def assert_clean(figures: Figures, rig: ScenarioRig, *, all_succeed: bool = False) -> None:
    """Every command answered, duplicates replayed, no key executed twice, no crash."""
    problems = figures.problems(all_succeed=all_succeed)
    assert not problems, f"{'; '.join(problems)}\n{figures.summary()}\n{rig.diagnostics()}"
    assert_no_crashes(figures, rig)


def assert_single_effects(figures: Figures) -> None:
    if figures.keys_with_multiple_effects:
        raise DoubleEffects(
            f"{figures.keys_with_multiple_effects} keys with more than one vendor effect\n"
            + figures.summary()
        )


def assert_no_crashes(figures: Figures, rig: ScenarioRig) -> None:
    assert figures.extra["crashes"] == 0, f"replicas died on their own\n{rig.diagnostics()}"
    codes = figures.extra["exit_codes_at_end"]
    assert set(codes) == {0}, f"replicas did not stop cleanly: {codes}\n{rig.diagnostics()}"


def missing(what: str) -> None:
    """A server or tool the scenario needs is not there: skip, or fail when ``CI`` is set
    (CI must run every scenario, never pass by skipping)."""
    unavailable(what)
