"""How many large effects a screen may have missed: the subsampling bound behind AtP*'s
false-negative diagnostic (Kramár et al. 2024).

A screen ranks N units, the top ones are verified exactly, and the other U are not. Patch a
uniform random sample of m of the U exactly as well. If K of the U have an effect above a
threshold, the number of them the sample finds is hypergeometric (U, K, m), so:

- a given unverified unit above the threshold escapes the sample with probability 1 − m/U;
- all K of them escape with probability C(U − K, m) / C(U, m) (`p_all_missed`);
- having found `found` of them, K is at most `max_above` with the stated confidence: the
  largest K for which finding `found` or fewer keeps probability above 1 − confidence.

Exact (integer binomials), so it holds for small samples and populations alike.
"""

from __future__ import annotations

from fractions import Fraction
from math import comb

from mechinterp.errors import InputError


def _check(n_unverified: int, n_sampled: int, found: int) -> None:
    if not 0 <= found <= n_sampled <= n_unverified:
        raise InputError(
            "need 0 <= found <= n_sampled <= n_unverified, got found="
            f"{found}, n_sampled={n_sampled}, n_unverified={n_unverified}"
        )


def p_at_most(found: int, n_unverified: int, n_above: int, n_sampled: int) -> float:
    """P(a uniform sample of `n_sampled` of `n_unverified` units holds at most `found` of the
    `n_above` units above the threshold)."""
    return float(_p_at_most(found, n_unverified, n_above, n_sampled))


def _p_at_most(found: int, n_unverified: int, n_above: int, n_sampled: int) -> Fraction:
    hits = sum(comb(n_above, i) * comb(n_unverified - n_above, n_sampled - i)
               for i in range(min(found, n_above, n_sampled) + 1))  # fmt: skip
    return Fraction(hits, comb(n_unverified, n_sampled))


def p_all_missed(n_unverified: int, n_above: int, n_sampled: int) -> float:
    """P(the sample holds none of `n_above` units above the threshold)."""
    return p_at_most(0, n_unverified, n_above, n_sampled)


def max_above(n_unverified: int, n_sampled: int, found: int, *, confidence: float = 0.95) -> int:
    """Upper confidence bound on how many of the `n_unverified` units are above the threshold,
    given that `found` of the `n_sampled` sampled ones are: the largest K not rejected at level
    1 − confidence (P(at most `found` | K) > 1 − confidence). With every unit sampled it is
    `found` itself."""
    _check(n_unverified, n_sampled, found)
    if not 0 < confidence < 1:
        raise InputError(f"confidence must lie in (0, 1), got {confidence}")
    alpha = 1 - Fraction(str(confidence))  # 0.9 as 9/10: the comparison below is exact
    k = found
    while k < found + (n_unverified - n_sampled) and (
        _p_at_most(found, n_unverified, k + 1, n_sampled) > alpha
    ):
        k += 1
    return k
