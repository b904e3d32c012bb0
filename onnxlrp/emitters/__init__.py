"""One emitter per ONNX op family, registered in one table (EMITTERS)."""
from .base import EMITTERS, GROUPS, Emitter, register
from . import attention, conv, dense, elementwise, norm, pool, shape  # noqa: F401  (registration side effects)

__all__ = ["EMITTERS", "GROUPS", "Emitter", "register"]
