"""The instructor's source of the graded assignment: the hidden cases (:mod:`instructor.hidden`)
and the isolated grader (:mod:`instructor.grader`). Not part of the installed package ``mesa_lib``."""
