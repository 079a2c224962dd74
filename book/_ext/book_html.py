"""Small HTML fixes for the book's jupyter-book 1.x / Sphinx 7.4 stack.

Sphinx 7.4 writes an inline ``<script>`` twice when an extension registers it after the
builder has started (it is stored once with filename ``None`` and re-added with ``''``).
sphinx-thebe's ``const THEBE_JS_URL = ...`` is such a script, so every page threw
"Identifier 'THEBE_JS_URL' has already been declared" in the browser console. This extension
drops the duplicates from each page's script list.

It also loads ``_static/widgets-mathjax3.js`` after MathJax: the ipywidgets renderer calls the
MathJax 2 API to typeset widget labels, and the book loads MathJax 3 (see the file).
"""

from __future__ import annotations


def _dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        attrs = getattr(js, "attributes", {})
        key = (getattr(js, "filename", js) or "", getattr(js, "priority", 500), tuple(sorted(attrs.items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique  # the builder restores its full list before the next page


def setup(app):
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    # after MathJax (priority 500, deferred), before the widgets render (window load event)
    app.add_js_file("widgets-mathjax3.js", loading_method="defer", priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
