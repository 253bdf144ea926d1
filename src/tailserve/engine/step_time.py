"""Step time as a function of the tokens in a step, fitted online: what admission predicts queue drain
times with and what the speculation controller prices a guess at."""

from __future__ import annotations


class StepTimeModel:
    """Step time ≈ a + b·tokens, fitted online by exponentially weighted least squares.

    A plain tokens/second average mixes tiny and full steps (a 6-token step runs at a tenth of a full
    chunk's rate), which mispredicts queue drain times by several times; the affine fit does not.
    """

    def __init__(self, decay: float = 0.95) -> None:
        self.decay = decay
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.intercept: float | None = None  # the last `a` fitted from steps of different sizes

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self.n, self.sx, self.sy = d * self.n + 1, d * self.sx + tokens, d * self.sy + seconds
        self.sxx, self.sxy = d * self.sxx + tokens * tokens, d * self.sxy + tokens * seconds
        fit = self._fit()
        if fit is not None:
            self.intercept = fit[0]

    def _fit(self) -> tuple[float, float] | None:
        """The least-squares (a, b) of the weighted steps, if their sizes differ enough to tell."""
        var = self.n * self.sxx - self.sx * self.sx
        if self.n < 2 or var <= 1e-9 * max(self.sxx, 1.0):
            return None
        b = (self.n * self.sxy - self.sx * self.sy) / var
        return max((self.sy - b * self.sx) / self.n, 0.0), max(b, 1e-7)

    def coefficients(self) -> tuple[float, float] | None:
        """(a, b), or None until steps of different sizes have been seen.

        A saturated engine runs full-budget steps only, all of one size, and the weights of the steps
        of other sizes decay away: then the intercept cannot be told from the slope. It keeps the
        last one fitted, and the slope is fitted to the recent steps' mean, so the prediction (what
        admission sheds by and the autoscaler scales on) holds exactly while the queue is longest."""
        fit = self._fit()
        if fit is not None:
            return fit
        if self.intercept is None or self.sx <= 0:
            return None
        a = self.intercept
        return a, max((self.sy - a * self.n) / self.sx, 1e-7)

    def seconds(self, tokens: int) -> float | None:
        """The time of a step of `tokens` tokens (None while unknown)."""
        ab = self.coefficients()
        return None if ab is None else ab[0] + ab[1] * tokens

    def rate(self, tokens: int) -> float:
        """Tokens per second through steps of `tokens` tokens (0 while unknown)."""
        t = self.seconds(tokens)
        return 0.0 if t is None else tokens / t
