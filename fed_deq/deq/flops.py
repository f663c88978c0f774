"""Standard FLOP estimates of the dense linear algebra the DEQ code runs (pure python, no torch).

One FLOP is one real addition or multiplication, so a real multiply-add is 2 FLOPs and a complex
multiply-add (4 real multiplications + 4 real additions) is 8. These are textbook operation counts, not
measurements: FFTs use the radix-2 count whatever the length, and the factorisations use the counts of
Golub & Van Loan, *Matrix Computations* (3rd ed., Table 5.4.1 and §8.3), times 4 for complex matrices.
``torch.utils.flop_counter.FlopCounterMode`` counts matrix products and convolutions the same way (2 per
real multiply-add) but nothing of FFTs or factorisations; tests/test_clock.py registers these estimates with
it so that a whole training step can be counted.
"""

from __future__ import annotations

import math

COMPLEX_FACTOR = 4   # a complex multiply-add costs 8 real FLOPs, a real one 2


def _factor(is_complex: bool) -> int:
    return COMPLEX_FACTOR if is_complex else 1


def matmul_flops(m: int, k: int, n: int, *, is_complex: bool = False, batch: int = 1) -> float:
    """``batch`` products of an [m, k] and a [k, n] matrix: 2 m k n per product (8 m k n if complex)."""
    return float(batch) * 2.0 * m * k * n * _factor(is_complex)


def fft_flops(n: int, *, kind: str, signals: int = 1) -> float:
    """``signals`` FFTs of ``n`` points (n = product of the transformed sizes).

    ``kind="c2c"``: 5 n log2 n (radix-2 Cooley-Tukey). ``"r2c"`` (rfft) and ``"c2r"`` (irfft): half of that,
    2.5 n log2 n. Lengths that are not powers of two are charged the same formula.
    """
    if n <= 1:
        return 0.0
    per = 5.0 * n * math.log2(n)
    if kind in ("r2c", "c2r"):
        per /= 2.0
    elif kind != "c2c":
        raise ValueError(f"unknown FFT kind {kind!r}; valid: c2c, r2c, c2r")
    return float(signals) * per


def eigh_flops(n: int, *, is_complex: bool = False, vectors: bool = False, batch: int = 1) -> float:
    """Hermitian eigensolve of an n x n matrix: 4/3 n^3 for eigenvalues only (Householder tridiagonalisation;
    the O(n^2) tridiagonal iteration is not charged), 9 n^3 with eigenvectors (symmetric QR); x4 if complex."""
    per = (9.0 if vectors else 4.0 / 3.0) * n ** 3
    return float(batch) * per * _factor(is_complex)


def svd_flops(m: int, n: int, *, is_complex: bool = False, vectors: bool = False, batch: int = 1) -> float:
    """SVD of an m x n matrix (Golub-Reinsch; p = max(m, n), q = min(m, n)).

    Singular values only: 4 p q^2 - 4/3 q^3. With the thin factors U and V (what ``torch.linalg.svd(...,
    full_matrices=False)`` and ``matrix_norm(ord=2)`` under autograd compute): 14 p q^2 + 8 q^3. x4 if complex.
    """
    p, q = max(m, n), min(m, n)
    per = (14.0 * p * q * q + 8.0 * q ** 3) if vectors else (4.0 * p * q * q - 4.0 / 3.0 * q ** 3)
    return float(batch) * per * _factor(is_complex)


def lu_solve_flops(n: int, rhs: int = 1, *, is_complex: bool = False, batch: int = 1) -> float:
    """Solve an n x n system with ``rhs`` right-hand sides by LU: 2/3 n^3 + 2 n^2 rhs; x4 if complex."""
    per = 2.0 / 3.0 * n ** 3 + 2.0 * n * n * rhs
    return float(batch) * per * _factor(is_complex)
