"""A small 3-D U-Net that segments membranes in the synthetic EM volume."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet3D"]


def _block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3x3 convolutions, each followed by GroupNorm and ReLU."""
    # GroupNorm rather than BatchNorm: the batches here are a handful of crops,
    # and a sample's output should not depend on the rest of its batch.
    groups = math.gcd(cout, 4)
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False),
        nn.GroupNorm(groups, cout),
        nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False),
        nn.GroupNorm(groups, cout),
        nn.ReLU(inplace=True),
    )


def _soft_dice(probs: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Dice coefficient over the whole batch (``eps`` smooths empty masks)."""
    inter = (probs * target).sum()
    return (2 * inter + eps) / (probs.sum() + target.sum() + eps)


class UNet3D(L.LightningModule):
    """A two-level 3-D U-Net for binary membrane segmentation.

    Encoder ``c -> 2c -> 4c`` channels (``c = base_channels``) with two 2x
    max-poolings, a decoder with transposed convolutions and skip
    connections, and a 1x1x1 head giving one logit per voxel. Crops must have
    sides divisible by 4. The loss is binary cross-entropy plus ``1 - Dice``.

    Batches are dicts with ``"image"`` and ``"mask"`` tensors of shape
    ``[B, in_channels, D, H, W]`` and ``[B, 1, D, H, W]`` (as produced by
    :class:`~lightning_threadsafe.examples.EMCropDataset`).

    Logged metrics: ``train/loss`` (every step, progress bar), ``val/loss``
    (progress bar) and ``val/dice`` (Dice of the thresholded prediction), both
    averaged over the validation epoch.

    Args:
        in_channels: image channels.
        base_channels: channels of the first level.
        lr: Adam learning rate.
        step_delay_ms: simulated accelerator compute per training step, in
            milliseconds: a ``time.sleep`` added to ``training_step``, so CPU-only
            experiments can model a GPU step of a chosen length (the sleep
            releases the GIL, like a step waiting on a CUDA kernel).

    Example::

        from lightning_threadsafe.examples import EMCropDataset, UNet3D

        model = UNet3D(base_channels=8, lr=1e-3)
        loader = torch.utils.data.DataLoader(EMCropDataset(crop=32), batch_size=4)
        L.Trainer(max_steps=100).fit(model, loader)
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 8,
        lr: float = 1e-3,
        step_delay_ms: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("base_channels", base_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
            raise ValueError(f"lr={lr!r} must be a finite number > 0")
        if (isinstance(step_delay_ms, bool) or not isinstance(step_delay_ms, (int, float))
                or not 0 <= step_delay_ms < math.inf):
            raise ValueError(f"step_delay_ms={step_delay_ms!r} must be a finite number >= 0")
        self.save_hyperparameters()
        c = base_channels
        self.enc1 = _block(in_channels, c)
        self.enc2 = _block(c, 2 * c)
        self.bottom = _block(2 * c, 4 * c)
        self.up2 = nn.ConvTranspose3d(4 * c, 2 * c, 2, stride=2)
        self.dec2 = _block(4 * c, 2 * c)
        self.up1 = nn.ConvTranspose3d(2 * c, c, 2, stride=2)
        self.dec1 = _block(2 * c, c)
        self.head = nn.Conv3d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-voxel membrane logits ``[B, 1, D, H, W]`` for images ``[B, C, D, H, W]``.

        Raises:
            ValueError: the input is not 5-D or a spatial side is not divisible by 4.
        """
        if x.ndim != 5 or any(s % 4 for s in x.shape[2:]):
            raise ValueError(f"input of shape {tuple(x.shape)} must be [B, C, D, H, W] "
                             "with D, H and W divisible by 4")
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool3d(e1, 2))
        b = self.bottom(F.max_pool3d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)

    def _loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self(batch["image"])
        target = batch["mask"].to(logits.dtype)
        probs = torch.sigmoid(logits)
        loss = F.binary_cross_entropy_with_logits(logits, target) + 1 - _soft_dice(probs, target)
        return loss, probs, target

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._loss(batch)
        if self.hparams.step_delay_ms > 0:
            time.sleep(self.hparams.step_delay_ms / 1000.0)  # simulated accelerator compute
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, probs, target = self._loss(batch)
        dice = _soft_dice((probs > 0.5).to(probs.dtype), target)
        n = batch["image"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=n)
        self.log("val/dice", dice, batch_size=n)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
