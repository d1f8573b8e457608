"""Polynomials over the prime field GF(65521), vectorised with numpy across many chunks at once.

A chunk commitment is the polynomial of degree < k through k points (x_i mod m, y_i), where x_i
are top-k indices, y_i their bf16 bit patterns (all finite bf16 values are < 0xFF81 < 65521) and
m <= 65521 is the largest modulus that keeps the k indices distinct. Everything here works on
(N, k) arrays: N chunks, k points each, so one call interpolates every chunk of a rollout.

Values stay below 2**16, so products stay below 2**32 and int64 arithmetic never overflows.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

PRIME = 65521
"""The field's modulus: the largest prime below 2**16, so coefficients fit in two bytes."""

_MODULUS_BATCH = 64  # candidate moduli tried per vectorised pass


@lru_cache(maxsize=1)
def inverse_table() -> np.ndarray:
    """``inv[a]`` = a**-1 mod PRIME for a in [1, PRIME) (``inv[0]`` = 0), by Fermat's theorem."""
    base = np.arange(PRIME, dtype=np.int64)
    result = np.ones(PRIME, dtype=np.int64)
    e = PRIME - 2
    while e:  # square-and-multiply on all elements at once: 16 rounds
        if e & 1:
            result = result * base % PRIME
        base = base * base % PRIME
        e >>= 1
    result[0] = 0
    result.setflags(write=False)
    return result


def injective_moduli(x: np.ndarray) -> np.ndarray:
    """(N, k) non-negative indices -> (N,) largest m <= PRIME with ``x[n] % m`` all distinct.

    Indices below PRIME are already distinct, so m = PRIME. Larger indices (long prefills) need a
    search; a collision among k = 128 residues has probability ~12% per candidate.
    """
    x = np.asarray(x, dtype=np.int64)
    n, k = x.shape
    result = np.zeros(n, dtype=np.int64)
    # Distinct indices below PRIME stay distinct mod PRIME, the largest candidate: no search
    # (a chunk of 32 positions of a model up to 2047 wide). Sorting checks they are distinct.
    small = x.max(axis=1, initial=0) < PRIME
    if small.any():
        ordered = np.sort(x[small], axis=1)
        if not (np.diff(ordered, axis=1) != 0).all():
            raise ValueError("indices of a chunk must be distinct")
        result[small] = PRIME
    todo = np.flatnonzero(~small)
    top = PRIME
    while todo.size:
        if top - _MODULUS_BATCH < k:
            raise ValueError(f"no modulus keeps {k} indices distinct")  # pragma: no cover
        cand = np.arange(top, top - _MODULUS_BATCH, -1, dtype=np.int64)  # (M,)
        res = np.sort(x[todo, None, :] % cand[None, :, None], axis=2)  # (n', M, k)
        ok = (np.diff(res, axis=2) != 0).all(axis=2)  # (n', M)
        found = ok.any(axis=1)
        result[todo[found]] = cand[ok[found].argmax(axis=1)]
        todo = todo[~found]
        top -= _MODULUS_BATCH
    return result


def interpolate(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, k) distinct field points x with values y -> (N, k) coefficients, lowest degree first.

    Newton's divided differences (k - 1 vectorised rounds), then the Newton form expanded into
    monomial coefficients (k - 1 more rounds), so a proof needs no nodes to be evaluated.
    """
    x = np.asarray(x, dtype=np.int64) % PRIME
    dd = np.asarray(y, dtype=np.int64) % PRIME  # becomes the Newton coefficients c_0..c_{k-1}
    inv = inverse_table()
    n, k = x.shape
    for j in range(1, k):
        den = inv[(x[:, j:] - x[:, :-j]) % PRIME]  # (N, k - j)
        # |difference| < 2**16 and den < 2**16: the product fits int64 before one modulus
        dd[:, j:] = (dd[:, j:] - dd[:, j - 1 : -1]) * den % PRIME
    # p(t) = c_0 + (t - x_0)(c_1 + (t - x_1)(c_2 + ...)): expand from the innermost term.
    coeffs = np.zeros((n, k), dtype=np.int64)
    coeffs[:, 0] = dd[:, k - 1]
    for i in range(k - 2, -1, -1):
        # coeffs <- coeffs * (t - x_i) + c_i: the degree grows from d - 1 to d = k - 1 - i, so
        # only the first d + 1 columns are live (half the work of updating all k on average)
        d = k - 1 - i
        scaled = x[:, i : i + 1] * coeffs[:, :d]  # (N, d), each < 2**32
        coeffs[:, 1 : d + 1] = coeffs[:, :d]  # times t (numpy copies overlapping views first)
        coeffs[:, 0] = dd[:, i]
        coeffs[:, :d] -= scaled
        coeffs[:, : d + 1] %= PRIME  # Python-style modulus: non-negative again
    return coeffs


def evaluate(coeffs: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(N, k) coefficients (lowest first) at (N, m) points -> (N, m) values, by Horner's rule."""
    c = np.asarray(coeffs, dtype=np.int64)
    t = np.asarray(t, dtype=np.int64) % PRIME
    acc = np.zeros(t.shape, dtype=np.int64)
    for i in range(c.shape[1] - 1, -1, -1):
        acc = (acc * t + c[:, i : i + 1]) % PRIME
    return acc
