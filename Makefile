# MESA Book — the two commands are `make book` and `make test`.
#
#   make book    install into .venv, get Fashion-MNIST, build the book (strict)
#   make test    install into .venv, get Fashion-MNIST, run pytest (+ notebooks via nbval),
#                build the book (strict), open every page in headless Chromium
#
# Other targets: install, data, bench, clean, distclean, help.

SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Debian's dataset-fashion-mnist package puts the four idx files here.
FMNIST_DIR   ?= /usr/share/datasets/fashion-mnist
FMNIST_FILES := train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
                t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz

# Extra arguments for pytest, e.g.  make test PYTEST_ARGS='-m "not slow" -x'
PYTEST_ARGS ?=

.PHONY: help install data book test test-device bench handouts clean distclean

help:
	@echo "make book   - install, fetch data, build the Jupyter Book into _build/html (strict)"
	@echo "make test   - install, fetch data, pytest on tests/ and the notebooks in book/ (nbval),"
	@echo "              then build the book (strict) and check every page in headless Chromium"
	@echo "make test-device - every notebook in strict-device mode (GPU-only mistakes fail on the CPU)"
	@echo "make handouts - student notebooks (solutions removed) from book/10_exercises.ipynb into handouts/"
	@echo "make install | data | bench | clean | distclean"

# ---------------------------------------------------------------- install
install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || { echo ">> creating virtual environment $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo ">> pip install -e \".[book,test]\" into $(VENV)"
	$(PY) -m pip install -e ".[book,test]"
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
	sudo=none; \
	if command -v apt-get >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; fi; \
	fi; \
	if [ "$$sudo" != none ]; then \
	  echo ">> installing Debian package dataset-fashion-mnist (apt-get)"; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist \
	  || { $$sudo apt-get update && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist; } \
	  || echo ">> apt-get could not install dataset-fashion-mnist; falling back to torchvision download"; \
	  if have_files; then echo ">> Fashion-MNIST installed in $(FMNIST_DIR)"; exit 0; fi; \
	else \
	  echo ">> apt-get not usable here (not root, no passwordless sudo); using torchvision download"; \
	fi; \
	echo ">> $(PY) -m mesa_lib fetch-data"; \
	$(PY) -m mesa_lib fetch-data && exit 0; \
	echo "ERROR: could not get Fashion-MNIST." >&2; \
	echo "  Neither 'apt-get install dataset-fashion-mnist' (needs root/sudo on Debian/Ubuntu)" >&2; \
	echo "  nor '$(PY) -m mesa_lib fetch-data' (needs internet) succeeded." >&2; \
	exit 1

# ---------------------------------------------------------------- book
# Strict: any warning (broken reference, missing glue key, failing notebook cell) fails it.
BUILD_BOOK = $(VENV)/bin/jupyter-book build . -W -n --keep-going

book: install data
	$(BUILD_BOOK)
	@echo ">> book built: open _build/html/index.html"

# ---------------------------------------------------------------- test
# 1. unit tests, and every notebook under book/ executed by nbval (--nbval-lax: outputs are
#    not compared; the notebooks' assert cells check their claims);
# 2. the strict book build (it executes the notebooks again: execute_notebooks: force);
# 3. the browser test on the built HTML (tests/test_book_browser.py); it must run here, so a
#    missing build, Playwright or Chromium is a failure, not a skip.
# Any failing step stops make with a non-zero status.
test: install data
	$(PY) -m pytest --nbval-lax $(PYTEST_ARGS) tests book --ignore=tests/test_book_browser.py
	$(BUILD_BOOK)
	MESA_BROWSER_TEST_REQUIRED=1 $(PY) -m pytest $(PYTEST_ARGS) tests/test_book_browser.py

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

# ---------------------------------------------------------------- handouts
# Student versions of the exercise notebook: solutions -> `raise NotImplementedError()`.
handouts: install
	$(PY) scripts/make_handouts.py --out handouts

# ---------------------------------------------------------------- clean
clean:
	rm -rf _build .pytest_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -type d \( -name __pycache__ -o -name .ipynb_checkpoints \) -print -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
