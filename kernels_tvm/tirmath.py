"""Vectorisable exp / tanh as plain TIR arithmetic.

LLVM lowers ``T.exp`` on a vector to one libm ``expf`` call per lane; the
attention kernels need one exponential per score, so they use this
polynomial (Cephes' expf: range reduction by ln 2, degree-6 polynomial, 2^n
built in the exponent bits), which vectorises on x86 and NEON alike and works
on GPUs too.  Max relative error ~2e-7 over the float32 range; inputs below
-87.3 return exactly 0 (so exp(-inf) == 0), inputs above 88.3 saturate.

The helpers take and return PrimExprs, so TVMScript kernels call them inline.
"""

from __future__ import annotations

from tvm import tirx

_LOG2E = 1.44269504088896341
_C1 = 0.693359375  # ln2 split in two (Cephes)
_C2 = -2.12194440e-4
_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _f(x: float):
    return tirx.const(x, "float32")


def _exp_core(xc):
    # exp(xc) for xc already clamped to [-87.34, 88.38]
    n = tirx.floor(xc * _f(_LOG2E) + _f(0.5))
    r = xc - n * _f(_C1) - n * _f(_C2)
    p = _f(_P[0])
    for c in _P[1:]:
        p = p * r + _f(c)
    p = p * r * r + r + _f(1.0)
    bits = tirx.shift_left(tirx.Cast("int32", n) + tirx.const(127, "int32"), tirx.const(23, "int32"))
    return p * tirx.reinterpret("float32", bits)


def fexp(x):
    """exp(x) for float32 x (scalar or inside a vectorised loop)."""
    y = _exp_core(tirx.max(tirx.min(x, _f(88.3762626647949)), _f(-87.3365447505531)))
    return tirx.Select(x < _f(-87.3365447505531), _f(0.0), y)


def fexp_nonpos(x):
    """exp(x) for float32 x <= 0, as in softmax's exp(s - rowmax); below -87.3 it returns exp(-87.3).

    Why a second exp: the attention kernels' softmax evaluates one exp per score, and there the
    argument is never positive and a result of ~1e-38 instead of 0 is invisible next to the row
    maximum's 1, so the upper clamp and the underflow select go (3 of ~20 vector instructions,
    and the constants they keep live). Masked scores are zeroed by the caller, not here.
    """
    return _exp_core(tirx.max(x, _f(-87.3365447505531)))


def ftanh(x):
    """tanh(x) = 1 - 2 / (exp(2x) + 1), float32 (absolute error ~1e-7)."""
    return _f(1.0) - _f(2.0) / (fexp(x * _f(2.0)) + _f(1.0))


def softcapped(x, cap: float):
    """cap * tanh(x / cap); identity when cap == 0."""
    if not cap:
        return x
    return _f(cap) * ftanh(x * _f(1.0 / cap))
