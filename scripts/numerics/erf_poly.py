"""Coefficients of kiln's vectorized erf (kernels/src/ops.rs, `ERF_POLY`), and their error.

erf(t) for t in [0, 4] as a polynomial of degree 16 in u = t/2 - 1 (in [-1, 1]): a least
squares fit at Chebyshev nodes, rounded to f32. Prints the coefficients (highest degree
first, as f32 bits) and the largest error of f32 Horner evaluation with fused multiply-adds
against double-precision erf on a fine grid. Needs numpy and scipy.
"""
import numpy as np
from numpy.polynomial import chebyshev
from scipy.special import erf

DEGREE, T = 16, 4.0
nodes = np.cos(np.linspace(0, np.pi, 4000))
coeffs = chebyshev.cheb2poly(chebyshev.chebfit(nodes, erf((nodes + 1) * T / 2), DEGREE)).astype(np.float32)

def horner_f32(t):
    u = (t * np.float32(2 / T) - np.float32(1)).astype(np.float32)
    acc = np.full_like(u, coeffs[-1])
    for c in coeffs[-2::-1]:
        acc = (acc.astype(np.float64) * u + np.float64(c)).astype(np.float32)  # one rounding, as an fma
    return acc

for c in coeffs[::-1]:
    print(f"0x{np.float32(c).view(np.uint32):08X}, // {c:.9e}")
t = np.linspace(0, T, 400001).astype(np.float32)
print("max |error| on [0, 4]:", np.abs(horner_f32(t).astype(np.float64) - erf(t.astype(np.float64))).max())
print("erf(4) is 1 - %.2e" % (1 - erf(4.0)))
print("polynomial at 0 and 4:", horner_f32(np.array([0.0, 4.0], dtype=np.float32)))
