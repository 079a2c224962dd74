"""The graded (hidden) cases of the assignment's checkers: the instructor's source, not part of
the installed package ``mesa_lib``.

:func:`hidden_cases` gives an item's cases (one point each), built with the case factories of
:mod:`mesa_lib.classroom.checks`; ``check_*(fn, hidden=True)`` and the isolated grader
(:mod:`instructor.grader`) run them. A class that grades keeps its own copy of this folder
private and may change the seeds and shapes below (the points are the number of cases per item).
"""

from __future__ import annotations

from typing import Callable

from mesa_lib.classroom import checks as c


def _cases() -> dict[str, list[Callable]]:
    return {
        'stamp one image': [c._stamp_one_case(0, 1, 8, 3, 0, 5), c._stamp_one_case(1, 3, 10, 2, 7, 2)],
        'batched stamping': [c._stamp_case(0, 4, 1, 8, 3), c._stamp_case(1, 3, 3, 10, 3), c._stamp_case(2, 5, 1, 7, 2, on_meta=True)],
        '51 patterns': [c._canonical_case(range(c.NUM_PATTERNS), True), c._canonical_case(range(300, 512, 3), False)],
        'testing function f': [c._testing_case(0, 32, 10, False), c._testing_case(1, 48, 10, True)],
        'hinge': [c._hinge_case(1, 64, 0.8), c._hinge_case(2, 50, 0.5), c._hinge_case(3, 66, c._per_sample_betas)],
        'DV bound': [c._dv_values_case(2, 50), c._dv_extreme_case(3, 40, 1000.0), c._dv_extreme_case(4, 40, -1000.0)],
        'MINE training step': [c._mine_case(0, 4, 9, 32), c._mine_case(1, 2, 2, 64), c._mine_case(2, 8, 27, 16)],
        'staircase mixture sampler': [c._mixture_case(0, [1.0, 1.0, 1.0]), c._mixture_case(1, [0.2, 0.3, 0.5]), c._mixture_case(2, [2.0, 0.0, 1.0])],
        'Gibbs optimum': [c._gibbs_case(lambda: c._toy_f(30), 0.8, 0.1), c._gibbs_case(c._random_f(1, 400), 0.5, 0.02),
                c._gibbs_case(lambda: c._toy_f(30), 0.9, 1e-3)],
        'mass inside X_beta': [c._mass_case(lambda: c._toy_f(30), 0.8, 0.05), c._mass_case(c._f_with_ties(1), 0.5, 0.1)],
        'target scan': [c._anomaly_case([0.91, 0.04, 0.02, 0.06, 0.03, 0.05, 0.01, 0.08, 0.02, 0.04]),
                c._anomaly_case([0.12, 0.08, 0.15, 0.11, 0.09, 0.1, 0.13, 0.07, 0.1, 0.14]),
                c._anomaly_case([0.01] * 6 + [0.95] + [0.01] * 3)],
        'retraining transform': [c._retrain_case((0.1, 0.0)), c._retrain_case((0.01,), seed=6), c._retrain_case((0.5,), True, seed=7)],
        'attack success rate': [c._asr_case(0, 5, 0, 0.3), c._asr_case(1, 10, 7, 0.5)],
        'sign test': [c._sign_case(0, 3, 14, 4), c._sign_case(1, 11, 2, 2), c._sign_case(2, 6, 6, 3, all_tied=True),
                c._sign_case(3, 520, 590, 30)],
        'bootstrap interval': [c._boot_case(c._SKEWED, 0.95, seed=1), c._boot_case(c._boot_values(2, 51), 0.9, seed=2, repeat=True),
                c._boot_case(c._SKEWED, 0.8, seed=3, constant=True)],
    }


def hidden_cases(name: str) -> list[Callable]:
    """The graded cases of the item ``name`` (a key of :data:`mesa_lib.classroom.checks.POINTS`,
    or "sign test" / "bootstrap interval" of chapter 9)."""
    return _cases()[name]
