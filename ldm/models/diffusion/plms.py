"""PLMS (pseudo linear multi-step) sampling: DDIM's schedule and loop, Adams-Bashforth eps combination."""
from __future__ import annotations

from ldm.models.diffusion.ddim import DDIMSampler, ddim_step

# Adams-Bashforth coefficients for the current and previous eps, by history length
_AB = {1: (3 / 2, -1 / 2), 2: (23 / 12, -16 / 12, 5 / 12), 3: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


class PLMSSampler(DDIMSampler):
    """Deterministic (eta must be 0). The first step is a pseudo improved-Euler step (two UNet calls)."""

    name = "PLMS"

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True):
        if ddim_eta != 0:
            raise ValueError("ddim_eta must be 0 for PLMS")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    def _reset(self):
        self.old_eps = []

    def _step(self, eps, x, t, t_next, index, noise):
        a_t, a_prev, _ = self._coefficients(index)
        e_t = eps(x, t)
        if not self.old_eps:
            # improved Euler: average eps at x_t and at the DDIM estimate of x_{t-1}
            x_prev, _ = ddim_step(x, e_t, a_t, a_prev, 0.0)
            e_prime = (e_t + eps(x_prev, t_next)) / 2
        else:
            history = self.old_eps[::-1][:3]
            coeffs = _AB[len(history)]
            e_prime = coeffs[0] * e_t
            for c, e in zip(coeffs[1:], history):
                e_prime = e_prime + c * e
        x_prev, pred_x0 = ddim_step(x, e_prime, a_t, a_prev, 0.0)
        self.old_eps.append(e_t)
        if len(self.old_eps) >= 4:
            self.old_eps.pop(0)
        return x_prev, pred_x0
