"""Errors onnxlrp raises. Each names what is wrong: file, node, op type, expected vs. got."""


class LRPError(Exception):
    """Base class of every error onnxlrp raises on purpose."""


class ModelLoadError(LRPError):
    """The model file (or proto) cannot be read, validated or prepared."""


class UnsupportedModelError(LRPError):
    """The model holds nodes that onnxlrp has no emitter for."""

    def __init__(self, message, nodes=()):
        super().__init__(message)
        self.nodes = list(nodes)


class RuleCompatibilityError(LRPError):
    """A rule was put on a layer it does not fit."""


class InputError(LRPError, ValueError):
    """An input array (or output selection) does not fit the model."""


class DeviceError(LRPError, RuntimeError):
    """The requested execution device is not available."""


class LRPWarning(UserWarning):
    """Something in an explanation a user should look at (e.g. exploding relevance)."""
