"""Solutions out of the published book.

The public build sets sphinx-exercise's ``hide_solutions: true`` (``_config.yml``): every
``{solution}`` block is dropped. sphinx-exercise drops the *gated* form too
(``{solution-start}`` ... ``{solution-end}``), but only the two markers: the notebook cells
between them -- the solution code of the graded assignment -- would still be rendered. This
extension removes those cells as well: with ``hide_solutions`` on, ``{solution-start}``
leaves a marker, and a transform deletes everything from the marker to the matching
``{solution-end}``.

The instructor build (``make book-instructor``, ``scripts/instructor_book.py``) turns
``hide_solutions`` off and shows every solution.
"""

from __future__ import annotations

from docutils import nodes
from sphinx.transforms import SphinxTransform
from sphinx_exercise.directive import SolutionStartDirective
from sphinx_exercise.nodes import solution_end_node


class hidden_solution_start(nodes.Element):
    """Where a gated solution began, in a build with hidden solutions."""


class _HidingSolutionStart(SolutionStartDirective):
    def run(self):
        out = super().run()  # registers the gated structure, as sphinx-exercise checks it
        if self.env.app.config.hide_solutions:
            return [hidden_solution_start()]
        return out


class DropHiddenGatedSolutions(SphinxTransform):
    """Delete the content of each hidden gated solution, up to and including its end marker."""

    default_priority = 9  # before sphinx-exercise's MergeGatedSolutions (10)

    def apply(self) -> None:
        for start in list(self.document.findall(hidden_solution_start)):
            parent = start.parent
            siblings = parent.children
            i = siblings.index(start)
            j = i
            while j < len(siblings) and not isinstance(siblings[j], solution_end_node):
                j += 1
            if j == len(siblings):
                raise ValueError(f"{self.env.docname}: a {{solution-start}} without its {{solution-end}}")
            for child in list(siblings[i:j + 1]):
                parent.remove(child)


def _skip(self, node) -> None:
    raise nodes.SkipNode


def setup(app):
    app.add_directive("solution-start", _HidingSolutionStart, override=True)
    app.add_transform(DropHiddenGatedSolutions)
    app.add_node(hidden_solution_start, html=(_skip, None), latex=(_skip, None), text=(_skip, None))
    return {"parallel_read_safe": True, "parallel_write_safe": True}
