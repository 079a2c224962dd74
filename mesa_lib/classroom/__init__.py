"""Teaching tools, kept apart from the method's modules: the graded assignment's checkers
(:mod:`~mesa_lib.classroom.checks`), the grading machinery behind them
(:mod:`~mesa_lib.classroom.grading`: partial credit, reference and loop detection) and the
rubric read from the assignment notebook's nbgrader metadata
(:mod:`~mesa_lib.classroom.rubric`).

In the assignment notebook (book/10_exercises.ipynb)::

    from mesa_lib.classroom import check_stamp

    def my_stamp(images, triggers, locations):
        ...

    check_stamp(my_stamp)               # a public example, with feedback
    # the graded cases: nbgrader's hidden tests run them in the isolated grader
    # (instructor/grader.py, not part of the installed package), a fresh process per item

The same checkers back the checked exercises at the end of chapters 2-9 (sphinx-exercise
blocks with hidden solutions; a ``remove-input`` cell runs each model solution through its
checker when the book is built). Chapter 9's two, :func:`check_sign_test` and
:func:`check_bootstrap_ci`, are not items of the graded assignment.
"""

from .checks import (  # noqa: F401
    CORRECT,
    POINTS,
    check_anomaly_index,
    check_attack_success,
    check_bootstrap_ci,
    check_canonical,
    check_dv_bound,
    check_gibbs_optimum,
    check_hinge,
    check_mine_step,
    check_mixture_sample,
    check_retrain_transform,
    check_sign_test,
    check_stamp,
    check_stamp_one,
    check_testing_function,
    check_valid_mass,
    grade_isolated,
    hidden_cases_available,
    paste_at_random,
)
from .grading import Score, summary  # noqa: F401
