"""Two-component beta mixture model fitted by EM on per-sample losses (Arazo et al., ICML 2019).

    x = normalise_losses(losses)              # losses: Float[N] -> [0, 1]
    bmm = BetaMixture.fit(x, max_iter=50)
    w = bmm.clean_posterior(x)                # P(clean | loss), non-increasing in the loss: Float64[N]

Losses are min-max normalised to [0, 1] and clamped to ``[eps, 1 - eps]`` (the beta density is
infinite or zero at the ends). EM as in Arazo et al.'s ``BetaMixture1D``:

* E-step: ``r_ik = pi_k Beta(x_i; a_k, b_k) / sum_k' pi_k' Beta(x_i; a_k', b_k')``;
* M-step: weighted method of moments per component,
  ``m = sum_i r_ik x_i / sum_i r_ik``, ``v = sum_i r_ik (x_i - m)^2 / sum_i r_ik``,
  ``a = m (m (1 - m) / v - 1)``, ``b = a (1 - m) / m``; ``pi_k = mean_i r_ik``.

:meth:`BetaMixture.posterior` is the exact posterior; :meth:`BetaMixture.clean_posterior` is the
monotone lookup-table version used for weighting (Arazo et al.'s fix, see there).

Initialisation (Arazo's): ``a = (1, 2)``, ``b = (2, 1)``, ``pi = (1/2, 1/2)`` — component 0 leans to
small losses. The *clean* component is the one with the smaller mean ``a / (a + b)`` (small loss =
the pair is learnt = likely a correct correspondence). Everything is float64 on CPU: N is the number
of samples in the loss memory (thousands), so this is cheap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

EPS = 1e-4


def normalise_losses(losses: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Min-max normalise to [0, 1], then clamp to [eps, 1 - eps]: Float[N] -> Float64[N]."""
    x = losses.detach().double().cpu()
    lo, hi = x.min(), x.max()
    x = (x - lo) / (hi - lo) if float(hi - lo) > 0 else torch.full_like(x, 0.5)
    return x.clamp(eps, 1 - eps)


def beta_log_pdf(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log Beta(x; a, b) = (a-1) log x + (b-1) log(1-x) - log B(a, b); broadcasts x [N, 1] with a, b [K]."""
    log_norm = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
    return (a - 1) * torch.log(x) + (b - 1) * torch.log1p(-x) - log_norm


@dataclass
class BetaMixture:
    alphas: torch.Tensor = field(default_factory=lambda: torch.tensor([1.0, 2.0], dtype=torch.float64))  # [2]
    betas: torch.Tensor = field(default_factory=lambda: torch.tensor([2.0, 1.0], dtype=torch.float64))  # [2]
    weights: torch.Tensor = field(default_factory=lambda: torch.tensor([0.5, 0.5], dtype=torch.float64))  # [2]
    n_iter: int = 0  # EM iterations run by the last fit

    @property
    def means(self) -> torch.Tensor:
        return self.alphas / (self.alphas + self.betas)

    @property
    def clean(self) -> int:
        """Index of the low-loss (clean) component."""
        return int(torch.argmin(self.means))

    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """log pi_k + log Beta(x_i; a_k, b_k): x Float[N] in (0, 1) -> Float64[N, 2]."""
        x = x.double().cpu()[:, None]
        return torch.log(self.weights.clamp_min(1e-300)) + beta_log_pdf(x, self.alphas, self.betas)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """E-step: r_ik = P(component k | x_i): Float64[N, 2], rows sum to 1."""
        return torch.softmax(self.log_joint(x), dim=1)

    def posterior(self, x: torch.Tensor, component: int | None = None) -> torch.Tensor:
        """P(component | x) (default: the clean component): Float64[N]."""
        return self.responsibilities(x)[:, self.clean if component is None else component]

    def clean_posterior(self, x: torch.Tensor, resolution: int = 1000) -> torch.Tensor:
        """P(clean | x) made non-increasing in the loss x, through a lookup table on a grid: Float64[N].

        A beta mixture can cross twice (a wide component wins at both ends), so the raw posterior of the
        clean component may drop again at tiny losses or rise again at huge ones. As Arazo et al.'s
        ``create_lookup``, the table is flattened after its minimum (a larger loss is never "cleaner"),
        then replaced by its smallest non-increasing majorant (a smaller loss is never "noisier").
        """
        grid = torch.linspace(EPS, 1 - EPS, resolution, dtype=torch.float64)
        table = self.posterior(grid)  # [R]
        low = int(torch.argmin(table))
        table[low:] = table[low]
        table = table.flip(0).cummax(0).values.flip(0)  # running max from the right
        idx = ((x.double().cpu().clamp(EPS, 1 - EPS) - EPS) / (1 - 2 * EPS) * (resolution - 1)).round().long()
        return table[idx]

    def m_step(self, x: torch.Tensor, r: torch.Tensor) -> None:
        """Weighted method of moments for (a_k, b_k) and the mixing weights pi_k (in place)."""
        x = x.double().cpu()
        mass = r.sum(0).clamp_min(1e-12)  # [2]
        mean = (r * x[:, None]).sum(0) / mass  # [2]
        var = (r * (x[:, None] - mean) ** 2).sum(0) / mass  # [2]
        var = torch.minimum(var.clamp_min(1e-8), mean * (1 - mean) * (1 - 1e-6))  # keep a, b > 0
        common = mean * (1 - mean) / var - 1
        self.alphas = (mean * common).clamp_min(1e-3)
        self.betas = (self.alphas * (1 - mean) / mean).clamp_min(1e-3)
        self.weights = mass / mass.sum()

    @classmethod
    def fit(cls, x: torch.Tensor, max_iter: int = 10, tol: float = 0.0) -> "BetaMixture":
        """EM from Arazo's initialisation on x Float[N] in (0, 1); ``tol`` > 0 stops when the mean
        log-likelihood improves by less than ``tol``. Arazo et al. run 10 iterations."""
        x = x.double().cpu().clamp(EPS, 1 - EPS)
        bmm = cls()
        prev = -math.inf
        for it in range(1, max_iter + 1):
            r = bmm.responsibilities(x)  # E-step
            bmm.m_step(x, r)  # M-step
            bmm.n_iter = it
            if tol > 0:
                ll = float(torch.logsumexp(bmm.log_joint(x), dim=1).mean())
                if ll - prev < tol:
                    break
                prev = ll
        return bmm

    def state(self) -> dict:
        return {"alphas": self.alphas.tolist(), "betas": self.betas.tolist(), "weights": self.weights.tolist()}

    @classmethod
    def from_state(cls, state: dict) -> "BetaMixture":
        return cls(*(torch.tensor(state[k], dtype=torch.float64) for k in ("alphas", "betas", "weights")))
