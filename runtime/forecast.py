"""Forecasters for the ``predict`` action: a site's output (or residual) at a skipped step, from
the values it had at its last computed steps.

Each is a pure function ``f(steps, values, at) -> tensor``: ``steps`` the computed step indices
(oldest first, increasing), ``values`` the cached tensors at those steps, ``at`` the step to
forecast (after the last one). The number of points is the plan's ``order`` + 1 (fewer early in
a generation); one point is plain reuse for every method. :data:`FORECASTERS` maps the plan's
``method`` names to them; ``Runtime.load`` dispatches on it.

``taylor``   the interpolating polynomial (Newton's divided differences), extrapolated: exact on
             polynomials of degree ``order`` (TaylorSeer, Liu et al. 2025).
``hermite``  HiCache (Feng et al. 2025): the same Taylor coefficients, but each monomial ``x**k``
             replaced by the dual-scaled physicists' Hermite polynomial ``s**k * H_k(s * x)``
             (``s`` = :data:`HERMITE_SCALE`).
``foca``     a FoCa-style predictor-corrector (Zheng et al. 2025, "Forecast then Calibrate") on
             the feature ODE ``dF/ds = g(s)``: forecast with the extrapolated finite-difference
             derivative, then one Heun (trapezoid) calibration.
``freq``     FreqCa-style (Liu et al. 2025): low token frequencies reused from the last computed
             step, high frequencies forecast with Taylor, recombined (cut at :data:`FREQ_CUTOFF`).

Half-precision values are combined in float32 and the result cast back. Each function's
docstring says exactly what it computes and what it is exact on (``tests/test_forecast.py``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

HERMITE_SCALE = 1 / math.sqrt(2)  # s in s**k H_k(s x); see hermite_forecast
FREQ_CUTOFF = 0.1  # share of the rfft bins along the token dimension that counts as "low"


def _work(values: list[torch.Tensor]) -> list[torch.Tensor]:
    return [v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for v in values]


def _check(name: str, steps: list[int], values: list[torch.Tensor]) -> None:
    if len(steps) != len(values) or not steps:
        raise ValueError(f"{name} needs as many steps as values, at least one")


def _newton(steps: list[int], values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Newton's divided differences along the newest edge: ``[f[s_n], f[s_n, s_n-1], ...]``."""
    table = _work(values)
    newton = [table[-1]]
    for level in range(1, len(steps)):
        table = [(table[i + 1] - table[i]) / float(steps[i + level] - steps[i]) for i in range(len(table) - 1)]
        newton.append(table[-1])
    return newton


def taylor_forecast(steps: list[int], values: list[torch.Tensor], at: int) -> torch.Tensor:
    """Extrapolate the polynomial through ``(steps[i], values[i])`` to step ``at``.

    Newton's form: with one point it is that value (reuse), with two a line, with three a
    parabola; the order follows the number of points. As TaylorSeer (Liu et al., "From Reusing
    to Forecasting: Accelerating Diffusion Models with TaylorSeers", 2025) forecasts features
    from finite differences of the last computed steps.

    Example:
        >>> ys = [torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([7.0])]  # at steps 0, 1, 2
        >>> float(taylor_forecast([0, 1, 2], ys, 3))   # y = s^2 + s + 1
        13.0
        >>> float(taylor_forecast([1, 2], ys[1:], 4))  # line through (1, 3), (2, 7)
        15.0
    """
    _check("taylor_forecast", steps, values)
    newton = _newton(steps, values)
    n = len(steps)
    out = newton[0].clone()
    factor = 1.0
    for k in range(1, n):
        factor *= float(at - steps[n - k])
        out = out + factor * newton[k]
    return out.to(values[-1].dtype)


def taylor_coefficients(steps: list[int], values: list[torch.Tensor]) -> list[torch.Tensor]:
    """``c[k]``: the Taylor coefficients, at the newest step, of the polynomial through the points
    (``p(steps[-1] + x) = sum(c[k] * x**k)``; ``c[k] = p^(k)(steps[-1]) / k!``, per step).

    Example:
        >>> ys = [torch.tensor(1.0), torch.tensor(3.0), torch.tensor(7.0)]  # s^2 + s + 1 at 0, 1, 2
        >>> [float(c) for c in taylor_coefficients([0, 1, 2], ys)]       # 7 + 5x + x^2 around s = 2
        [7.0, 5.0, 1.0]
    """
    _check("taylor_coefficients", steps, values)
    n = len(steps)
    newton = _newton(steps, values)
    # p(s_n + x) = sum_k newton[k] * prod_{j<k} (x + d_j), d_j = s_n - s_{n-j}: expand each product
    coeffs = [torch.zeros_like(newton[0]) for _ in range(n)]
    basis = [1.0]  # coefficients of the product so far, lowest power first
    for k in range(n):
        for power, b in enumerate(basis):
            coeffs[power] = coeffs[power] + b * newton[k]
        d = float(steps[-1] - steps[n - 1 - k])
        basis = [d * b + (basis[p - 1] if p else 0.0) for p, b in enumerate(basis)] + [basis[-1]]
    return coeffs


def hermite_forecast(steps: list[int], values: list[torch.Tensor], at: int, scale: float | None = None) -> torch.Tensor:
    """HiCache's scaled-Hermite forecast (Feng et al., "HiCache: Training-free Acceleration of
    Diffusion Models via Hermite Polynomial-based Feature Caching", 2025).

    With ``c[k]`` the Taylor coefficients of the polynomial through the points at the newest step
    (:func:`taylor_coefficients`, exact derivatives of the interpolant, where HiCache's code uses
    TaylorSeer's backward differences) and ``x = at - steps[-1]`` in steps, it returns
    ``sum_k c[k] * s**k * H_k(s * x)`` with ``H_k`` the *physicists'* Hermite polynomials
    (``H_0 = 1``, ``H_1 = 2y``, ``H_{k+1} = 2y H_k - 2k H_{k-1}``) and ``s = scale`` (default
    :data:`HERMITE_SCALE`): HiCache's dual scaling, the argument contracted by ``s`` and the k-th
    term damped by ``s**k``. With ``u = sqrt(2) * s``, ``s**k H_k(s x) = u**k He_k(u x)``
    (probabilists' ``He``), so the forecast is ``E[p(steps[-1] + u*u*x + i*u*Z)]``, Z ~ N(0, 1):
    the interpolant at a step contracted by ``u**2`` and smoothed along the imaginary axis.

    Exactness (tested): at the default ``s = 1/sqrt(2)`` (``u = 1``, ``He_k(x)``) order 1 is
    Taylor, exact on lines; order 2 returns the parabola's value less its curvature term
    ``c[2]`` (``He_2(x) = x**2 - 1``). For any ``s`` it equals that closed form on polynomials of
    its order. HiCache's own code uses ``s = 0.5`` (``u**2 = 1/2``: half the step).

    Example:
        >>> ys = [torch.tensor(1.0), torch.tensor(3.0)]        # the line 2s - 1 at steps 1, 2
        >>> round(float(hermite_forecast([1, 2], ys, 4)), 6)   # s = 1/sqrt(2): exact on lines
        7.0
        >>> round(float(hermite_forecast([1, 2], ys, 4, scale=0.5)), 6)  # 3 + 2 * (x = 2) / 2
        5.0
    """
    _check("hermite_forecast", steps, values)
    s = HERMITE_SCALE if scale is None else float(scale)
    coeffs = taylor_coefficients(steps, values)
    y = s * float(at - steps[-1])
    out = coeffs[0].clone()
    h_prev, h_cur = 1.0, 2.0 * y  # H_0(y), H_1(y)
    for k in range(1, len(coeffs)):
        out = out + (s ** k * h_cur) * coeffs[k]
        h_prev, h_cur = h_cur, 2.0 * y * h_cur - 2.0 * k * h_prev
    return out.to(values[-1].dtype)


def foca_forecast(steps: list[int], values: list[torch.Tensor], at: int) -> torch.Tensor:
    """A forecast-then-calibrate (PECE) step on the feature ODE ``dF/ds = g(s)``, after FoCa
    (Zheng et al., "Forecast then Calibrate: Feature Caching as ODE for Efficient Diffusion
    Transformers", 2025). Our scheme (the paper's exact update is not reproduced):

    1. ``g`` is sampled by finite differences of the cached features, each placed at the middle
       of its interval (where a difference is a second-order derivative estimate), and
       extrapolated as the polynomial through those samples (degree = order - 1). Its value at
       the newest step is ``g_n`` (= ``c[1]`` of :func:`taylor_coefficients`).
    2. Forecast (predictor, Adams-Bashforth style): ``F_p = F_n + integral of g from s_n to at``,
       which is the Taylor forecast.
    3. Evaluate: the slope at the forecast point, as the finite difference of the forecast
       trajectory, ``g_p = (F_p - F_n) / h`` with ``h = at - s_n``.
    4. Calibrate (corrector, Heun / trapezoid): ``F = F_n + h/2 * (g_n + g_p)``, i.e. the mean of
       the Euler step ``F_n + h g_n`` and the forecast ``F_p``.

    Exactness (tested): exact on lines at every order (order 1 is Taylor); on a parabola it keeps
    half of the extrapolated curvature, ``F = p(at) - c[2] h**2 / 2``.

    Example:
        >>> ys = [torch.tensor(0.0), torch.tensor(1.0), torch.tensor(4.0)]   # s^2 at steps 0, 1, 2
        >>> float(foca_forecast([0, 1, 2], ys, 4))   # p(4) - c[2] h^2 / 2 = 16 - 1 * 4 / 2
        14.0
        >>> float(foca_forecast([1, 2], ys[1:], 4))  # a line: Euler = Taylor
        10.0
    """
    _check("foca_forecast", steps, values)
    if len(steps) == 1:
        return values[-1].clone()
    coeffs = taylor_coefficients(steps, values)
    h = float(at - steps[-1])
    predicted = coeffs[0].clone()
    for k in range(1, len(coeffs)):
        predicted = predicted + h ** k * coeffs[k]
    euler = coeffs[0] + h * coeffs[1]
    return (0.5 * (euler + predicted)).to(values[-1].dtype)


def lowpass(x: torch.Tensor, cutoff: float, dim: int = -2) -> torch.Tensor:
    """``x`` keeping the lowest ``ceil(cutoff * bins)`` (at least one) of its rfft bins along ``dim``.

    Example:
        >>> t = torch.arange(8.0)
        >>> torch.allclose(lowpass(t, 0.0, dim=0), torch.full((8,), 3.5))   # the mean alone
        True
    """
    n = x.shape[dim]
    spec = torch.fft.rfft(x, dim=dim)
    bins = spec.shape[dim]
    keep = max(1, min(bins, math.ceil(cutoff * bins)))
    spec = spec.narrow(dim, 0, keep)
    return torch.fft.irfft(spec, n=n, dim=dim)


def freq_forecast(steps: list[int], values: list[torch.Tensor], at: int, cutoff: float | None = None) -> torch.Tensor:
    """FreqCa-style forecast (Liu et al., "FreqCa: Accelerating Diffusion Models via
    Frequency-Aware Caching", 2025): split the feature by frequency along its token dimension
    (dim -2: ``[batch, tokens, channels]``; the last dim of a 1-D tensor), reuse the low band from
    the newest computed step and forecast the high band with :func:`taylor_forecast` (the paper
    uses a second-order Hermite predictor there), then recombine. The low band is the lowest
    ``ceil(cutoff * bins)`` bins of ``torch.fft.rfft`` (at least the mean; ``cutoff`` default
    :data:`FREQ_CUTOFF`). As the split is linear, this is ``T - lowpass(T - F_n)`` with ``T`` the
    Taylor forecast. The split is 1-D along the token order as the site sees it (for a video
    model the flattened frame, row, column patch order), not over the patch grid. (The paper's
    cumulative residual feature is what a coalesced run of blocks caches here: one residual.)

    Exactness (tested): exact on a signal whose low band is constant and whose high band is a
    polynomial of the order in the step; a low band that moves is held at its newest value.

    Example:
        >>> low, high = torch.ones(4, 1), torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])  # DC, Nyquist
        >>> ys = [low + s * high for s in (0, 1)]
        >>> torch.equal(freq_forecast([0, 1], ys, 3), low + 3 * high)
        True
    """
    _check("freq_forecast", steps, values)
    last = values[-1]
    if last.dim() == 0:
        return last.clone()
    dim = -2 if last.dim() >= 2 else -1
    taylor = _work([taylor_forecast(steps, values, at)])[0] if len(steps) > 1 else _work([last])[0]
    drift = taylor - _work([last])[0]
    out = taylor - lowpass(drift, FREQ_CUTOFF if cutoff is None else float(cutoff), dim=dim)
    return out.to(last.dtype)


FORECASTERS: dict[str, Callable[[list[int], list[torch.Tensor], int], torch.Tensor]] = {
    "taylor": taylor_forecast, "hermite": hermite_forecast, "foca": foca_forecast, "freq": freq_forecast}
METHODS = tuple(FORECASTERS)  # the plan's `method` values; taylor is the default


def forecast_by(method: str, steps: list[int], values: list[torch.Tensor], at: int) -> torch.Tensor:
    """The ``method`` forecaster of :data:`FORECASTERS` at ``at``.

    Example:
        >>> float(forecast_by("taylor", [0, 1], [torch.tensor(0.0), torch.tensor(1.0)], 2))
        2.0
    """
    try:
        fn = FORECASTERS[method]
    except KeyError:
        raise ValueError(f"unknown forecast method {method!r}; known: {list(METHODS)}") from None
    return fn(steps, values, at)


__all__ = ["FORECASTERS", "FREQ_CUTOFF", "HERMITE_SCALE", "METHODS", "foca_forecast", "forecast_by", "freq_forecast",
           "hermite_forecast", "lowpass", "taylor_coefficients", "taylor_forecast"]
