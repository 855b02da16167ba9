"""Which denoising step, which CFG branch and which generation a call belongs to.

The step index is found from the timestep input alone, so that a caller's sampling loop needs
no change: a timestep different from the previous call's is the next step, the same timestep
again is the next classifier-free-guidance branch of the same step (where the timestep is half
precision, in which two steps' timesteps can round to one value, only with the same latents:
other latents at the same timestep are the next step), and a timestep that moves
against the samplers' direction starts a new generation. Samplers count down (diffusers'
schedulers hand the model 999 ... 0 or 1.0 ... 0.0) unless shown otherwise: three one-step
generations in a row, each begun by a rise (what a sampler that counts up, as Z-Image's
pipeline does with ``t`` from 0 to 1, looks like to a counting-down reader), are taken for one
generation that counts up; the third call is its step 2, with the caches of the first two
dropped (what they stored was labelled as another generation's step 0, so the next steps
compute rather than read it), and from then on a fall starts a generation. Three one-step
generations begun by falls turn it back. A reset, an explicit step or a call that raised
ends such a streak: the generation after it was not begun by a move. The timestep a call is read
by is the maximum of its timestep tensor (per-sample and per-token timesteps: Wan2.2's
image-to-video gives its first frame timestep 0). Once a generation has run, its schedule is
known: a later generation that has followed it for two steps and then moves on to a timestep
the schedule does not have next (a new generation started further along, e.g. image-to-image
after an interrupted run) starts a new generation instead of continuing. A restart exactly at
the timestep the old schedule had next cannot be told from a continuation: say so explicitly.

Callers that know better can start a generation (:meth:`StepState.start`, what
``ditopt.generation`` and ``ditopt.reset`` do), override one call with :meth:`StepState.set`,
or tell it every step with :meth:`StepState.tell` (a pipeline's step callback does): the calls
until the next tell are that step's CFG branches, and the timestep is then never read on the host.
The first call after a tell of step 0 starts a generation, whatever step it is told (a second
expert that the pipeline first calls at step k, as Wan2.2's ``transformer_2``, reads no cache of
the last generation). Once a told step has moved on, the number of calls a step takes is known
(step 0's apart from the others'; until then it is taken to be at most ``UNTOLD_AFTER``). A told
step that gets more calls than that reads the timestep of its first call and of this one (the
only host reads while told): the same, it is a step with one more call (skip-layer guidance adds
a pass at some steps) and the width grows; another, the step has lost its teller, and that call
reads the timestep again rather than being taken for one more branch of the told step (as every
later call would be). After a told generation ran to its end (the callback told step 0), it is a
run without the callback: that call's step is the number of timesteps seen since (1 when step 0
took no more calls than the told run's; more, with the caches dropped, when the told run's step
0 took more calls than this run's). Otherwise (a told run cut short outside the model, since a
call that raises ends the generation by itself; or a pipeline that never calls the callback) it
starts a new generation, with a warning, and so does the next call whose timestep differs from
it, for the calls at this timestep may have begun in the middle of a step's CFG branches.
``one_generation`` (the profiler's calibration run) makes every new timestep the next step,
whichever way it moves.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import Callable


UNTOLD_AFTER = 8  # calls at a told step, while no tell has moved on, after which it is taken as untold
MAX_BRANCHES = 16  # calls in a row at one timestep after which the next starts a new generation


@dataclass
class StepState:
    """Step tracking for one optimised model.

    Example:
        >>> s = StepState()
        >>> [s.observe(t) for t in (999.0, 999.0, 500.0, 500.0, 999.0)]
        [(0, 0, True), (0, 1, False), (1, 0, False), (1, 1, False), (0, 0, True)]
        >>> up = StepState()   # a sampler that counts up: seen for what it is at its third step
        >>> [up.observe(t) for t in (0.0, 0.25, 0.5, 0.75, 0.0)], up.rising
        ([(0, 0, True), (0, 0, True), (2, 0, True), (3, 0, False), (0, 0, True)], True)
    """

    step: int = -1
    branch: int = 0
    generation: int = -1
    calls: int = 0
    _last_t: float | None = field(default=None, repr=False)
    _override: tuple[int, int] | None = field(default=None, repr=False)
    _told: int | None = field(default=None, repr=False)  # the step told by tell(), until the next tell
    _told_calls: int = field(default=0, repr=False)
    _told_width: int | None = field(default=None, repr=False)  # the most calls a told step > 0 had
    _step0_width: int | None = field(default=None, repr=False)  # the calls the last told step 0 had
    _told_ts: list = field(default_factory=list, repr=False)  # the told step's calls' timesteps (lazy: t or t())
    _fresh: bool = field(default=False, repr=False)  # step 0 was told: the next call starts a generation
    _seen: list[float] = field(default_factory=list, repr=False)  # timesteps of a told step 0 found untold
    _last_fp: float | None = field(default=None, repr=False)  # the last untold call's latents fingerprint
    _step0_calls: int = field(default=0, repr=False)  # the calls step 0 of this generation took
    _restart_on_move: bool = field(default=False, repr=False)  # the teller was lost mid-generation
    _schedule: list[float] = field(default_factory=list, repr=False)  # a recent generation's timesteps
    _current: list[float] = field(default_factory=list, repr=False)  # this generation's, one per step
    _offset: int | None = field(default=None, repr=False)  # where _current starts in _schedule
    rising: bool = False  # the direction samplers are taken to count (see the module docstring)
    one_generation: bool = False  # every new timestep is the next step (a calibration run)
    _streak: list[float] = field(default_factory=list, repr=False)  # one-step generations begun against it

    def observe(self, t: float | Callable[[], float],
                fingerprint: Callable[[], float] | None = None) -> tuple[int, int, bool]:
        """Advance on a call whose timestep is ``t`` (or ``t()``: read only when the step is not
        told); return ``(step, branch, new_generation)``. ``fingerprint()``, where given (the
        latents' first sample summed; for half-precision timesteps, where two steps' timesteps
        can round to one value), tells a call at the last call's timestep whose latents differ
        from the last call's for the next step rather than one more branch."""
        new_generation = False
        if self._override is None and self._told is not None and (untold := self._untold(t)):
            if untold == "continue":  # a run without the callback after a told generation
                seen = self._seen  # the timesteps the told step 0's calls and this one had
                self.step, self.branch, self._last_t = len(seen) - 1, 0, seen[-1]
                self._current, self._offset = [], None
                self.calls += 1
                return self.step, self.branch, self.step > 1  # a call taken for step 0 was not: drop caches
        elif self._override is None and self._told is not None:
            self.step, self.branch = self._told, self._told_calls
            self._told_calls += 1
            self._told_ts.append(t)
            new_generation, self._fresh = self._fresh, False
            if new_generation:
                self.generation += 1
                self.calls = 0
            self.calls += 1
            return self.step, self.branch, new_generation
        t = t() if callable(t) else t
        fp, self._last_fp = self._last_fp, None if fingerprint is None else fingerprint()
        collided = fp is not None and self._last_fp is not None and t == self._last_t and self._last_fp != fp
        if self._override is not None:
            step, branch = self._override
            self._override = None
            new_generation = step == 0 and branch == 0
            self.step, self.branch, self._streak = step, branch, []  # told, not begun by a move
            if not new_generation and branch == 0:
                self._current.append(t)
        elif self._last_t is None or (self._restart_on_move and t != self._last_t):
            self.step, self.branch, new_generation = 0, 0, True
            self._restart_on_move = self._restart_on_move and self._last_t is None  # until the first move
        elif collided:  # the last step's timestep, other latents: the next step, rounded to it
            self.step, self.branch = self.step + 1, 0
            self._current.append(t)
            self._streak = []
        elif t == self._last_t and self.branch + 1 >= MAX_BRANCHES and not self.one_generation:
            self._warn_repeats()  # a loop calling at one timestep (a benchmark): bound the caches
            self.step, self.branch, new_generation = 0, 0, True
        elif t == self._last_t:
            self.branch += 1
        elif self.one_generation or ((t > self._last_t) == self.rising and not self._leaves_schedule(t)):
            self._check_warm_up()
            self.step, self.branch = self.step + 1, 0
            self._current.append(t)
            self._streak = []
        elif self._turns(t):  # the last two one-step generations and this call are one generation
            self.step, self.branch, new_generation = 2, 0, True  # new: the runtime drops the caches
            self.rising, self.calls, self.generation = not self.rising, 2, self.generation - 1
            self._current, self._streak, self._offset = self._streak, [], None
        else:
            self.step, self.branch, new_generation = 0, 0, True
        if new_generation and self.step == 0:
            self.generation += 1
            self.calls = 0
            self._remember([t])
        self.calls += 1
        self._last_t = t
        return self.step, self.branch, new_generation

    def _untold(self, t: float | Callable[[], float]) -> str:
        """Whether this call is one more than a told step takes (the step callback stopped telling,
        or never told a step: the pipeline does not call it); if so, leave told mode (see the
        module docstring) and say how: "continue" (the told generation ran to its end: this call
        is a later step of a run without the callback) or "restart" (a new generation from this
        call). A call past the width at the told step's own timestep widens it (returns "")."""
        widths = (self._step0_width, self._told_width) if self._told == 0 else (self._told_width, self._step0_width)
        width = next((w for w in widths if w is not None), None)
        limit = UNTOLD_AFTER if width is None else width
        if self._told_calls < limit:
            return ""
        first, now = _read(self._told_ts[0]), _read(t)
        if now == first:  # one more call at this step (skip-layer guidance's extra pass)
            if width is not None:
                if self._told == 0:
                    self._step0_width = self._told_calls + 1
                else:
                    self._told_width = self._told_calls + 1
            return ""
        seen = [*map(_read, self._told_ts), now]
        calls, self._seen = self._told_calls, list(dict.fromkeys(seen))
        self._told, self._told_calls, self._told_ts, self._last_t = None, 0, [], None
        if width is not None and self.step == 0:
            return "continue"
        # this call is the first at its timestep (a step's first branch) unless the call before had it too
        self._restart_on_move = seen[-2] == now
        why = ("no step callback told the next step (a told run cut short? call ditopt.reset after one)"
               if width is not None
               else "the step callback has not been called (this pipeline does not call callback_on_step_end: "
                    "pipelines with the older callback= take ditopt.step_callback(model, steps=N) there, with "
                    "callback_steps=1)")
        warnings.warn(f"ditopt: step {self.step} was told and has had {calls} calls, but {why}; the step is found "
                      f"from the timestep again, from a new generation", RuntimeWarning, stacklevel=4)
        return "restart"

    def _check_warm_up(self) -> None:
        """At the move to step 1 and to step 2: warn when step 0 took more calls than step 1, as
        when a call before the sampling loop (a warm-up on dummy inputs) had its first timestep:
        it was taken for one of step 0's CFG branches, and step 1 may have read what it cached."""
        if self.step == 0:
            self._step0_calls = self.branch + 1
        elif self.step == 1 and self._step0_calls > self.branch + 1:
            warnings.warn(f"ditopt: step 0 took {self._step0_calls} calls and step 1 {self.branch + 1}: a call "
                          f"before the sampling loop at its first timestep (a warm-up?) was taken for one of step 0's "
                          f"CFG branches, and step 1 may have read what it cached; call ditopt.reset(model) after "
                          f"such a call", RuntimeWarning, stacklevel=5)

    def _warn_repeats(self) -> None:
        warnings.warn(f"ditopt: {MAX_BRANCHES} calls in a row at one timestep were taken for CFG branches of one "
                      f"step; the next starts a new generation (each call computes, the caches stay bounded). "
                      f"Timing a model with one input? call ditopt.reset(model) between calls, or give each call "
                      f"its step with ditopt.set_step", RuntimeWarning, stacklevel=5)

    def _turns(self, t: float) -> bool:
        """Whether this move ends a third one-step generation in a row begun against the direction
        (the direction turns); keeps that streak up to date otherwise."""
        if (t > self._last_t) == self.rising or self.step != 0:  # along it, or a longer generation ended
            self._streak = []
            return False
        if not self._streak or self._streak[-1] != self._last_t:
            self._streak = [self._last_t]
        self._streak.append(t)
        return len(self._streak) >= 3

    def _leaves_schedule(self, t: float) -> bool:
        """Whether a lower timestep ``t`` cannot be this generation's next step: it has followed
        the known schedule for two steps or more, and the schedule has another timestep next."""
        if self._offset is None or len(self._current) < 2 or t == self._last_t or not self._follows(self._current):
            return False
        nxt = self._offset + len(self._current)
        return nxt < len(self._schedule) and self._schedule[nxt] != t

    def _remember(self, current: list[float]) -> None:
        """Start tracking a new generation's timesteps; keep the last one's as the known schedule
        unless it followed a part of it or started lower (image-to-image runs a schedule's tail)."""
        done = self._current
        further = (operator.le if self.rising else operator.ge)
        if done and not self._follows(done) and (not self._schedule or further(done[0], self._schedule[0])):
            self._schedule = done
        self._current = current
        self._offset = self._schedule.index(current[0]) if current and current[0] in self._schedule else None

    def _follows(self, timesteps: list[float]) -> bool:
        s, o = self._schedule, self._offset
        return o is not None and s[o:o + len(timesteps)] == timesteps
    def set(self, step: int, branch: int = 0) -> None:
        """Force the next call to be ``step`` / ``branch`` (step 0, branch 0 starts a generation)."""
        self._override = (_count("step", step), _count("branch", branch))

    @property
    def told(self) -> int | None:
        """The step told by the last :meth:`tell` (None when the step is found from the timestep)."""
        return self._told

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
        step = _count("step", step)
        if self._told is not None and self._told_calls and step != self._told:
            if self._told == 0:
                self._step0_width = self._told_calls
            else:
                self._told_width = max(self._told_width or 0, self._told_calls)
        self._told, self._told_calls, self._told_ts, self._restart_on_move = step, 0, [], False
        self._fresh = self._fresh or step == 0

    def reset(self) -> None:
        """Forget everything: the next call starts a new generation at step 0."""
        self.step, self.branch, self._last_t, self._override, self.calls = -1, 0, None, None, 0
        self._told, self._told_calls, self._streak = None, 0, []  # the next call is not begun by a move
        self._told_ts, self._restart_on_move, self._fresh = [], False, False
        self._remember([])  # what ran is still a known schedule


def _read(t: float | Callable[[], float]) -> float:
    return t() if callable(t) else t


def _count(name: str, value) -> int:
    """``value`` as a step or branch index: an integer >= 0 (numpy integers too), else ValueError."""
    try:
        index = operator.index(value) if not isinstance(value, bool) else -1
    except TypeError:
        index = -1
    if index < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return index
