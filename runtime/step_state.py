"""Which denoising step, which CFG branch and which generation a call belongs to.

The step index is found from the timestep input alone, so that a caller's sampling loop needs
no change: a timestep different from the previous call's is the next step, the same timestep
again is the next classifier-free-guidance branch of the same step, and a timestep that goes
back up (diffusion samplers count down) starts a new generation. Callers that know better can
override it for one call with :meth:`StepState.set`, or tell it every step with
:meth:`StepState.tell` (a pipeline's step callback does): the calls until the next tell are that
step's CFG branches, and the timestep is then never read on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class StepState:
    """Step tracking for one optimised model.

    Example:
        >>> s = StepState()
        >>> [s.observe(t) for t in (999.0, 999.0, 500.0, 500.0, 999.0)]
        [(0, 0, True), (0, 1, False), (1, 0, False), (1, 1, False), (0, 0, True)]
    """

    step: int = -1
    branch: int = 0
    generation: int = -1
    calls: int = 0
    _last_t: float | None = field(default=None, repr=False)
    _override: tuple[int, int] | None = field(default=None, repr=False)
    _told: int | None = field(default=None, repr=False)  # the step told by tell(), until the next tell
    _told_calls: int = field(default=0, repr=False)

    def observe(self, t: float | Callable[[], float]) -> tuple[int, int, bool]:
        """Advance on a call whose timestep is ``t`` (or ``t()``: read only when the step is not
        told); return ``(step, branch, new_generation)``."""
        new_generation = False
        if self._override is None and self._told is not None:
            self.step, self.branch = self._told, self._told_calls
            self._told_calls += 1
            new_generation = self.step == 0 and self.branch == 0
            if new_generation:
                self.generation += 1
                self.calls = 0
            self.calls += 1
            return self.step, self.branch, new_generation
        t = t() if callable(t) else t
        if self._override is not None:
            step, branch = self._override
            self._override = None
            new_generation = step == 0 and branch == 0
            self.step, self.branch = step, branch
        elif self._last_t is None or t > self._last_t:
            self.step, self.branch, new_generation = 0, 0, True
        elif t == self._last_t:
            self.branch += 1
        else:
            self.step, self.branch = self.step + 1, 0
        if new_generation:
            self.generation += 1
            self.calls = 0
        self.calls += 1
        self._last_t = t
        return self.step, self.branch, new_generation

    def set(self, step: int, branch: int = 0) -> None:
        """Force the next call to be ``step`` / ``branch`` (step 0, branch 0 starts a generation)."""
        if step < 0 or branch < 0:
            raise ValueError(f"step and branch must be >= 0, got step={step}, branch={branch}")
        self._override = (step, branch)

    def tell(self, step: int) -> None:
        """The calls from now until the next tell are step ``step`` (its CFG branches in call order);
        step 0 starts a generation. No timestep is read while told. :meth:`reset` ends it.

        Example:
            >>> s = StepState()
            >>> s.tell(0); [s.observe(lambda: 1 / 0) for _ in range(2)]
            [(0, 0, True), (0, 1, False)]
            >>> s.tell(1); s.observe(lambda: 1 / 0)
            (1, 0, False)
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        self._told, self._told_calls = step, 0

    def reset(self) -> None:
        """Forget everything: the next call starts a new generation at step 0."""
        self.step, self.branch, self._last_t, self._override, self.calls = -1, 0, None, None, 0
        self._told, self._told_calls = None, 0
