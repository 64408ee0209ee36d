"""pass@k: the chance that at least one of k samples passes the tests, estimated without bias from n >= k samples
of which c passed (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1):

    pass@k = E_tasks[ 1 - C(n - c, k) / C(n, k) ]

computed as the product 1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms the huge binomials.
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate for one task: n samples, c of them passed, k drawn."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:  # every draw of k holds a passing sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(passed: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k over tasks, each given as its samples' pass flags (every task needs at least k samples)."""
    if not passed:
        return 0.0
    return sum(pass_at_k(len(flags), sum(map(bool, flags)), k) for flags in passed) / len(passed)
