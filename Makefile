# MESA Book — the two commands are `make book` and `make test`.
#
#   make book    install into .venv, get Fashion-MNIST, execute every notebook once,
#                build the book (strict) from those outputs
#   make test    install into .venv, get Fashion-MNIST and Chromium, run pytest (unit tests and
#                every notebook, each executed once), build the book (strict) from the
#                notebooks' outputs, open every page in headless Chromium
#
# Other targets: install, data, bench, clean, distclean, help.

SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Extras installed by `make install`: the build needs `book`; `test` adds pytest, Playwright, Ray.
EXTRAS ?= book,test

# Debian's dataset-fashion-mnist package puts the four idx files here.
FMNIST_DIR   ?= /usr/share/datasets/fashion-mnist
FMNIST_FILES := train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
                t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz

# make book FORCE=1 executes every notebook; by default a notebook whose executed copy is up to date
# (nothing it reads changed: scripts/notebooks.py's inputs_stamp) is not executed again.
FORCE ?=

# Extra arguments for pytest, e.g.  make test PYTEST_ARGS='-m "not slow" -x'
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (--dist loadfile: a test file runs in one worker): half of the
# notebooks in each worker first (tests/test_notebooks.py, tests/test_notebooks_lane_b.py), the unit
# test files around them; each worker (and its notebook kernels) uses one torch thread.
# 0 runs everything in one process.
PYTEST_WORKERS ?= 2

.PHONY: help install data browser book book-instructor test test-device bench handouts readme-results clean distclean

help:
	@echo "make book   - install, fetch data, execute every notebook once, build the Jupyter Book"
	@echo "              into _build/html (strict) from those outputs"
	@echo "make test   - install, fetch data and Chromium, pytest on tests/ (unit tests + every notebook,"
	@echo "              each executed once), build the book (strict) from the notebooks' outputs,"
	@echo "              and check every page in headless Chromium"
	@echo "make book-instructor - the solved instructor version (solutions, instructor guide) into _build/instructor"
	@echo "make test-device - every notebook in strict-device mode (GPU-only mistakes fail on the CPU)"
	@echo "make handouts - student notebooks (solutions removed) from book/10_exercises.ipynb into handouts/"
	@echo "make install | data | bench | clean | distclean"

# ---------------------------------------------------------------- install
install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || { echo ">> creating virtual environment $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo ">> pip install -e \".[$(EXTRAS)]\" into $(VENV)"
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	@touch $@

# ---------------------------------------------------------------- data
# 1. Fashion-MNIST already in $(FMNIST_DIR)  -> nothing to do.
# 2. apt-get usable (root, or passwordless sudo) -> install dataset-fashion-mnist.
# 3. otherwise, or if apt failed -> `python -m mesa_lib fetch-data` (torchvision
#    download into the user cache; needs internet).
# Fails with a clear message only if both 2 and 3 fail.
data: $(STAMP)
	@have_files() { for f in $(FMNIST_FILES); do [ -s "$(FMNIST_DIR)/$$f" ] || return 1; done; }; \
	if have_files; then \
	  echo ">> Fashion-MNIST found in $(FMNIST_DIR)"; exit 0; \
	fi; \
	scripts/apt_install.sh dataset-fashion-mnist \
	  || echo ">> no Debian package dataset-fashion-mnist; falling back to torchvision download"; \
	if have_files; then echo ">> Fashion-MNIST installed in $(FMNIST_DIR)"; exit 0; fi; \
	echo ">> $(PY) -m mesa_lib fetch-data"; \
	$(PY) -m mesa_lib fetch-data && exit 0; \
	echo "ERROR: could not get Fashion-MNIST." >&2; \
	echo "  Neither 'apt-get install dataset-fashion-mnist' (needs root/sudo on Debian/Ubuntu)" >&2; \
	echo "  nor '$(PY) -m mesa_lib fetch-data' (needs internet) succeeded." >&2; \
	exit 1

# ---------------------------------------------------------------- browser
# The browser test drives Debian's chromium (never `playwright install`). Installed with
# apt-get where that is usable (root or passwordless sudo), as for the data; otherwise one
# line says what to install.
CHROMIUM ?= /usr/bin/chromium

browser:
	@if [ -x "$(CHROMIUM)" ]; then echo ">> Chromium found at $(CHROMIUM)"; exit 0; fi; \
	scripts/apt_install.sh --no-install-recommends chromium; \
	if [ -x "$(CHROMIUM)" ]; then echo ">> Chromium installed at $(CHROMIUM)"; exit 0; fi; \
	echo "ERROR: the browser test needs Chromium at $(CHROMIUM): install it (Debian/Ubuntu: sudo apt-get install chromium) or point CHROMIUM=/path/to/chromium (exported as MESA_CHROMIUM)." >&2; \
	exit 1

# ---------------------------------------------------------------- book
# Every notebook is executed once (scripts/notebooks.py, or tests/test_notebooks.py under
# make test) into the jupyter-cache at _build/.jupyter_cache; the strict build
# (execute_notebooks: cache) takes the outputs from there. Strict: any warning (broken
# reference, missing glue key) fails it, and so does a notebook the build had to execute
# itself (it would have run twice, or without its test).
BUILD_LOG  = _build/build.log
BUILD_BOOK = mkdir -p _build && set -o pipefail && $(VENV)/bin/jupyter-book build . -W -n --keep-going 2>&1 | tee $(BUILD_LOG) \
	&& $(PY) scripts/notebooks.py --check-cached \
	&& { ! grep -n "Executing notebook" $(BUILD_LOG) || { echo "ERROR: the build executed a notebook itself (see above); run the notebooks first" >&2; exit 1; }; }

book: install data
	$(PY) scripts/notebooks.py $(if $(FORCE),--force,)
	$(BUILD_BOOK)
	@echo ">> book built: open _build/html/index.html"

# The solved instructor version (solutions shown, the instructor guide in the toc) into
# _build/instructor/_build/html, from the same executed notebooks; keep it off public servers.
book-instructor: install data
	$(PY) scripts/notebooks.py
	$(PY) scripts/instructor_book.py

# ---------------------------------------------------------------- test
# 1. pytest on tests/, in $(PYTEST_WORKERS) pytest-xdist workers: the unit tests, and every
#    notebook of the toc executed once (tests/test_notebooks.py; the notebooks' assert cells
#    check their claims), writing the executed notebooks into the build's cache (one writer at
#    a time);
# 2. the strict book build from those outputs (no notebook is executed a second time);
# 3. the browser test on the built HTML (tests/test_book_browser.py); it must run here, so a
#    missing build, Playwright or Chromium is a failure, not a skip.
# Any failing step stops make with a non-zero status.
test: install data browser
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests --ignore=tests/test_book_browser.py
	$(BUILD_BOOK)
	MESA_BROWSER_TEST_REQUIRED=1 MESA_CHROMIUM=$(CHROMIUM) $(PY) -m pytest $(PYTEST_ARGS) tests/test_book_browser.py

# ---------------------------------------------------------------- test-device
# Every chapter with MESA_STRICT_DEVICE=1: data and models on mesa_lib.devicecheck's simulated
# device, so .numpy() on a device tensor, host/device mixing and host tensors indexed with
# device indices fail here as they would on a GPU. (tests/test_device.py, part of `make test`,
# checks the library and chapter 3 so; this runs all chapters, after `make test` warmed the cache.)
test-device: install data
	MESA_STRICT_DEVICE=1 $(PY) -m pytest --nbval-lax $(PYTEST_ARGS) book

# ---------------------------------------------------------------- bench
bench: install data
	$(PY) bench/bench_mesa.py

# ---------------------------------------------------------------- README
# The README's results section, generated from the committed results files.
readme-results: install
	$(PY) scripts/readme_results.py

# ---------------------------------------------------------------- handouts
# The student version of the graded assignment: nbgrader's preprocessors (solutions -> `raise
# NotImplementedError()`, hidden tests removed) and the MyST markup rendered as plain Markdown.
handouts: install
	$(PY) scripts/make_handouts.py --out handouts

# ---------------------------------------------------------------- clean
clean:
	rm -rf _build .pytest_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -type d \( -name __pycache__ -o -name .ipynb_checkpoints \) -print -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
