"""Exceptions of the training loop that belong to no other module (data set errors are
:class:`knet_lightning.data.meta.DatasetError`, checkpoint errors
:class:`knet_lightning.checkpoint_io.CheckpointError`)."""

from __future__ import annotations

__all__ = ["NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive training steps had a NaN or infinite loss."""
