"""The paper's equations, written out in float64 (forward, manual backward, update).

Independent of the library: plain tensor arithmetic from PAPER.md, no batch_norm kernel.
"""

from __future__ import annotations

import torch


def _c(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(1, -1, *([1] * (ndim - 2)))


def paper_renorm(x, gamma, beta, running_mean, running_var, r_max, d_max, alpha, eps, g_y=None):
    """Returns y, the new (running_mean, running_var), r, d and, given g_y, (g_x, g_gamma, g_beta)."""
    x, gamma, beta = x.double(), gamma.double(), beta.double()
    dims = [0, *range(2, x.dim())]
    m = x.numel() // x.shape[1]
    mu_b = x.mean(dims)
    sigma_b = torch.sqrt(eps + ((x - _c(mu_b, x.dim())) ** 2).mean(dims))
    mu = running_mean.double()
    sigma = torch.sqrt(running_var.double() + eps)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max)
    d = torch.clamp((mu_b - mu) / sigma, -d_max, d_max)
    xc = x - _c(mu_b, x.dim())
    x_hat = xc / _c(sigma_b, x.dim()) * _c(r, x.dim()) + _c(d, x.dim())
    y = _c(gamma, x.dim()) * x_hat + _c(beta, x.dim())
    new_mu = mu + alpha * (mu_b - mu)
    new_sigma = sigma + alpha * (sigma_b - sigma)
    new_var = torch.clamp_min(new_sigma**2 - eps, 0)
    grads = None
    if g_y is not None:
        g_y = g_y.double()
        g_xhat = g_y * _c(gamma, x.dim())
        g_sig_b = (g_xhat * xc).sum(dims) * (-r / sigma_b**2)
        g_mu_b = g_xhat.sum(dims) * (-r / sigma_b)
        g_x = (g_xhat * _c(r / sigma_b, x.dim()) + _c(g_sig_b, x.dim()) * xc / _c(m * sigma_b, x.dim())
               + _c(g_mu_b / m, x.dim()))
        grads = (g_x, (g_y * x_hat).sum(dims), g_y.sum(dims))
    return y, (new_mu, new_var), (r, d), grads
