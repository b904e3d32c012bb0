"""Symbolic tensors for rule hooks that act on activations at run time.

`modify_input(x)` and `modify_denominator(z)` receive a :class:`Sym` while the relevance graph is being
emitted: arithmetic on it (``x + 1``, ``x * y``, ``x.clip(min=0)``, ``abs(x)``) becomes ONNX nodes. The same
hook gets a numpy array when called directly, so a rule can be unit-tested on plain arrays. Use the
module-level helpers (:func:`keep_positive`, :func:`stabilize`, ...) to write code that works on both.
"""
from __future__ import annotations

import numpy as np


class Sym:
    """An activation tensor inside the relevance graph being emitted.

    ``shape`` is the static shape without the batch dimension; ``batched`` is False for constants that
    broadcast over the batch (they have a leading dimension of 1).
    """

    __array_priority__ = 1000  # make numpy defer to our operators in `ndarray * Sym`

    def __init__(self, builder, var, shape, batched=True):
        self.builder = builder
        self.var = var
        self.shape = tuple(shape)
        self.batched = batched
        self.fill = None  # the scalar a constant tensor is filled with (multiplying by 1 can be skipped)

    # -- helpers -------------------------------------------------------------------------------------
    def _wrap(self, var, batched=None):
        return Sym(self.builder, var, self.shape, self.batched if batched is None else batched)

    def _operand(self, other):
        if isinstance(other, Sym):
            return other.var, other.batched
        arr = np.asarray(other, dtype=self.builder.dtype)
        return self.builder.const(arr), False

    def _binary(self, op, other, reverse=False):
        var, batched = self._operand(other)
        inputs = [var, self.var] if reverse else [self.var, var]
        return self._wrap(self.builder.op(op, inputs), batched=self.batched or batched)

    # -- arithmetic ----------------------------------------------------------------------------------
    def __add__(self, o): return self._binary("Add", o)
    def __radd__(self, o): return self._binary("Add", o, reverse=True)
    def __sub__(self, o): return self._binary("Sub", o)
    def __rsub__(self, o): return self._binary("Sub", o, reverse=True)
    def __mul__(self, o): return self._binary("Mul", o)
    def __rmul__(self, o): return self._binary("Mul", o, reverse=True)
    def __truediv__(self, o): return self._binary("Div", o)
    def __rtruediv__(self, o): return self._binary("Div", o, reverse=True)
    def __neg__(self): return self._wrap(self.builder.op("Neg", [self.var]))
    def __abs__(self): return self._wrap(self.builder.op("Abs", [self.var]))
    def __pow__(self, p): return self._binary("Pow", p)

    def clip(self, min=None, max=None):
        b = self.builder
        empty = ""
        lo = b.const(np.asarray(min, dtype=b.dtype)) if min is not None else empty
        hi = b.const(np.asarray(max, dtype=b.dtype)) if max is not None else empty
        return self._wrap(b.op("Clip", [self.var, lo, hi]))

    def sign0(self):
        """sign with sign(0) = +1, as stabilizers need."""
        b = self.builder
        zero = b.const(np.asarray(0, dtype=b.dtype))
        ge = b.op("GreaterOrEqual", [self.var, zero])
        return self._wrap(b.op("Where", [ge, b.const(np.asarray(1, b.dtype)), b.const(np.asarray(-1, b.dtype))]))

    def positive_mask(self):
        b = self.builder
        return self._wrap(b.op("Cast", [b.op("Greater", [self.var, b.const(np.asarray(0, b.dtype))])],
                               attrs={"to": b.onnx_dtype}))

    def negative_mask(self):
        b = self.builder
        return self._wrap(b.op("Cast", [b.op("Less", [self.var, b.const(np.asarray(0, b.dtype))])],
                               attrs={"to": b.onnx_dtype}))

    def full_like(self, value):
        """A constant with this tensor's shape (batch dimension 1, broadcasting over the batch)."""
        arr = broadcast_bound(value, self.shape, self.builder.dtype)
        sym = Sym(self.builder, self.builder.const(arr), self.shape, batched=False)
        sym.fill = float(value) if np.ndim(value) == 0 else None
        return sym

    def ones_like(self):
        return self.full_like(1.0)

    def zeros_like(self):
        return self.full_like(0.0)


def broadcast_bound(value, shape, dtype):
    """Bring a bound to shape (1, *shape): a scalar, a 1-D per-channel vector (length C for an input of
    shape (C, ...)), or an array that broadcasts to the input's shape (numpy rules, no batch axis)."""
    arr = np.asarray(value, dtype=dtype)
    full = (1,) + tuple(shape)
    if arr.ndim == 1 and len(shape) >= 2:
        if arr.shape[0] != shape[0]:
            raise ValueError(f"a 1-D bound is per channel: expected {shape[0]} values for the layer input of "
                             f"shape {tuple(shape)}, got {arr.shape[0]}")
        arr = arr.reshape((arr.shape[0],) + (1,) * (len(shape) - 1))
    try:
        return np.ascontiguousarray(np.broadcast_to(arr, full))
    except ValueError:
        raise ValueError(f"bound of shape {np.shape(value)} does not broadcast to the layer input "
                         f"shape {tuple(shape)}") from None


# -- helpers that work on numpy arrays and Sym alike ---------------------------------------------------
def keep_positive(x):
    return x.clip(min=0) if isinstance(x, Sym) else np.maximum(x, 0)


def keep_negative(x):
    return x.clip(max=0) if isinstance(x, Sym) else np.minimum(x, 0)


def ones_like(x):
    return x.ones_like() if isinstance(x, Sym) else np.ones_like(x)


def zeros_like(x):
    return x.zeros_like() if isinstance(x, Sym) else np.zeros_like(x)


def sign0(x):
    """sign(x) with sign(0) = +1."""
    return x.sign0() if isinstance(x, Sym) else np.where(np.asarray(x) >= 0, 1, -1).astype(np.asarray(x).dtype)


class DivisionGuard(float):
    """A stabilizer that is only there to keep a division finite (RelevancePropagation.jl's 1f-9 in the rules
    without an epsilon parameter), as opposed to a rule's epsilon. In a float64 graph it shrinks by the
    ratio of the machine epsilons (1e-9 -> 1.9e-18), so that LRP-0 in double equals gradient x input to
    double rounding instead of to 1e-9 / |z|."""

    def for_dtype(self, dtype):
        if np.dtype(dtype) == np.float64:
            return float(self) * float(np.finfo(np.float64).eps / np.finfo(np.float32).eps)
        return float(self)


def stabilize(z, epsilon):
    """z + epsilon * sign(z), with sign(0) = +1, so a zero denominator becomes epsilon."""
    dtype = z.builder.dtype if isinstance(z, Sym) else np.asarray(z).dtype
    if isinstance(epsilon, DivisionGuard):
        epsilon = epsilon.for_dtype(dtype)
    if isinstance(z, Sym):
        # (z + eps) - 2 eps [z < 0], on every layer's pre-activations: onnxruntime's Where with scalar
        # branches is several times slower than Less + Cast + Mul.
        b = z.builder
        shifted = b.op("Add", [z.var, b.const(np.asarray(epsilon, dtype))])
        scale = _step_scale(dtype, epsilon)
        if scale is not None:
            # The step -2 eps [z < 0] as Clip(z * scale, -2 eps, 0): every z < 0, down to the smallest
            # subnormal, times the scale is <= -2 eps, so the sum is the same bit for bit, in float ops
            # alone: no bool tensor to Cast, which made the relevance run on ResNet50 up to 10 % slower.
            step = b.op("Clip", [b.op("Mul", [z.var, b.const(np.asarray(scale, dtype))]),
                                 b.const(np.asarray(-2 * epsilon, dtype)), b.const(np.asarray(0, dtype))])
            return z._wrap(b.op("Add", [shifted, step]))
        negative = b.op("Cast", [b.op("Less", [z.var, b.const(np.asarray(0, dtype))])], attrs={"to": b.onnx_dtype})
        return z._wrap(b.op("Sub", [shifted, b.op("Mul", [negative, b.const(np.asarray(2 * epsilon, dtype))])]))
    return z + sign0(z) * np.asarray(epsilon, dtype=dtype)


def _step_scale(dtype, epsilon):
    """The largest power of two of ``dtype`` where it takes the smallest subnormal to 2 * epsilon or beyond
    (then Clip(z * scale, -2 eps, 0) is -2 eps for every z < 0), else None (epsilon above 2^-23 in float32:
    EpsilonRule's 1e-6, not the division guard's 1e-9)."""
    info = np.finfo(dtype)
    scale = 2.0 ** (info.maxexp - 1)
    return scale if 2 * epsilon <= float(info.smallest_subnormal) * scale else None
