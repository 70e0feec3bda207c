"""Clicks painted into SAM's dense mask prompt: each click a +/- disc in the ``1/4``-resolution
logits fed as ``mask_input``, in the same place and size at training (:func:`paint_clicks`, a
batch of clicks in the model input frame) and at inference (:func:`click_disc_logits`, one
image's clicks in image coordinates). Small models trained from scratch need it to leave the
empty-mask collapse (``../shared/findings/sam-from-scratch-on-cpu.md``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def paint_clicks(mask_input: torch.Tensor | None, coords: torch.Tensor, labels: torch.Tensor,
                 input_size: int, radius: float = 10.0, value: float = 10.0) -> torch.Tensor:
    """Paint clicks as +/- ``value`` discs into ``Nx1xLxL`` low-res logits (L = S / 4).

    ``coords`` NxKx2 (x, y) in the model input frame, ``labels`` NxK (1 pos, 0 neg, -1 none). Later
    clicks overwrite earlier ones, as :func:`click_disc_logits`.
    Returns a new tensor (``mask_input`` is not modified; None = zeros).
    """
    n = coords.shape[0]
    s = input_size // 4
    out = (torch.zeros(n, 1, s, s, device=coords.device) if mask_input is None
           else mask_input.detach().clone())
    r = max(radius / 4.0, 0.5)
    ys = torch.arange(s, device=coords.device, dtype=torch.float32) + 0.5
    for k in range(coords.shape[1]):
        cx = (coords[:, k, 0].float() + 0.5) / 4.0
        cy = (coords[:, k, 1].float() + 0.5) / 4.0
        d2 = (ys[None, None, :] - cx[:, None, None]) ** 2 + \
             (ys[None, :, None] - cy[:, None, None]) ** 2
        lab = labels[:, k]
        disc = (d2 <= r * r) & (lab >= 0)[:, None, None]
        val = torch.where(lab > 0, value, -value).float()[:, None, None].expand(-1, s, s)
        out[:, 0] = torch.where(disc, val, out[:, 0])
    return out


def click_disc_logits(low_res: np.ndarray | None, clicks: Sequence[Any],
                      original_size: tuple[int, int], input_size: int, radius: float = 10.0,
                      value: float = 10.0, transform: Any = None) -> np.ndarray:
    """SAM mask prompt with each click painted as a +/- ``value`` disc of ``radius`` px (model
    input frame) into the ``1xSxS`` low-res logits (S = input_size / 4); zeros when None.
    ``transform`` is the model's own input-frame transform (SAM 2's square resize); None = SAM
    v1's longest-side resize."""
    s = input_size // 4
    out = np.zeros((1, s, s), dtype=np.float32) if low_res is None else \
        np.array(low_res, dtype=np.float32).reshape(1, s, s).copy()
    h, w = original_size
    if transform is None:
        sx = sy = input_size / max(h, w) / 4.0  # image px -> low-res px
    else:
        sx, sy = (float(v) / 4.0 for v in transform.apply_coords(np.ones((1, 2)), (h, w))[0])
    r = radius / 4.0
    yy, xx = np.mgrid[0:s, 0:s]
    for c in clicks:
        cx, cy = (c.x + 0.5) * sx, (c.y + 0.5) * sy
        disc = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= max(r, 0.5) ** 2
        out[0][disc] = value if c.positive else -value
    return out
