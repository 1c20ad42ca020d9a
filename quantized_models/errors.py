"""Exceptions raised by model loading, with messages that say how to fix the problem."""


class ModelLoadError(RuntimeError):
    """A model directory or file cannot be used (missing, corrupt or inconsistent)."""


class CheckpointError(ModelLoadError):
    """A checkpoint's tensors do not match the model built from its configuration."""
