"""Exceptions, named as BERG names them so existing `except` clauses keep working."""

from __future__ import annotations


class BERGError(Exception):
    """Base class of every error berg-jax raises on purpose."""


class InvalidParameterError(BERGError, ValueError):
    """A parameter (model id, subject, selection key, device, ...) is not one of the valid values."""


class ValidationError(BERGError, ValueError):
    """A selection's content is invalid (unknown ROI, voxel mask of the wrong length, ...)."""


class StimulusError(BERGError, ValueError):
    """The stimulus array is not a valid video batch (shape, channels, frames, value range)."""


class ModelLoadError(BERGError):
    """A model file is missing, truncated, of the wrong format, or has unexpected keys/shapes."""


class VideoReadError(BERGError):
    """A video file could not be decoded into 14 RGB frames."""


class DownloadError(BERGError):
    """A download failed or did not verify (size, ETag or SHA-256)."""


class UsageError(Exception):
    """A command-line mistake; its message is printed as one line and the exit status is 2.

    Raised by the library too where a command-line choice cannot work (`distributed.setup`'s
    flags, `merge` of a folder without shards); `berg_jax.cli.main` reports it.
    """
