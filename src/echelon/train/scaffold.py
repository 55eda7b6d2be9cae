"""SCAFFOLD (Karimireddy et al., ICML 2020) with option II control variates.

Each client i keeps a control variate c_i; the server keeps c. A local step corrects the client
gradient by the estimated client drift,  y <- y - lr * (g_i(y) - c_i + c),  and after K steps

    c_i+ = c_i - c + (x - y) / (K * lr)          (option II)

The client sends (y - x, c_i+ - c_i); with full participation the server averages both:
x <- x + mean(y - x), c <- c + mean(c_i+ - c_i). In Echelon's runtime the exchanged state is the
concatenation theta (+) c, so that server rule is exactly the averaging outer step.
"""

from __future__ import annotations

import torch


def corrected_gradient(grad: torch.Tensor, c: torch.Tensor, c_i: torch.Tensor) -> torch.Tensor:
    """g - c_i + c: the drift-corrected local gradient."""
    return grad - c_i + c


def control_update(
    c_i: torch.Tensor, c: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float
) -> torch.Tensor:
    """Option II: c_i+ = c_i - c + (x - y) / (K * lr)."""
    return c_i - c + (x - y) / (steps * lr)
