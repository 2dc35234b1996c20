# Two commands set everything up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the pair that installs from local disk here (never a newer torch)
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# MMSegmentation's K-Net, the reference peer of the parity tests only (tests/mmseg_peer.py): pure
# Python, installed with --no-deps because mmcv-lite's metadata would pull opencv-python and change numpy
PEER_SPEC ?= mmsegmentation==1.2.2 mmcv-lite==2.1.0 mmengine==0.10.7
PEER_DEPS ?= addict termcolor yapf opencv-python-headless matplotlib ftfy regex prettytable
STAMP := $(VENV)/.installed
PEER_STAMP := $(VENV)/.peers
BROWSER_STAMP := $(VENV)/.browser
PYTEST_ARGS ?=
ARGS ?=

.PHONY: install train lint test test-all bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

$(PEER_STAMP): $(STAMP) Makefile
	$(BIN)/python -m pip install --no-deps $(PEER_SPEC)
	$(BIN)/python -m pip install $(PEER_DEPS)
	touch $(PEER_STAMP)

# the browser test's headless Chromium (tests/test_serve.py: Selenium with Debian's chromium and
# chromium-driver). Installed with apt-get where this runs as root; elsewhere the test skips and
# prints why, and this is tried again at the next `make test`
$(BROWSER_STAMP): $(STAMP)
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then touch $(BROWSER_STAMP); \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
		&& touch $(BROWSER_STAMP) || echo "chromium could not be installed: the browser test will skip"; \
	else echo "chromium is not installed and apt-get needs root: the browser test will skip"; fi

install: $(STAMP)

# the main job on the embedded synthetic data set (CPU, 2 cores: about 8.5 minutes with AVX2 only, 7 with AVX-512)
train: $(STAMP)
	$(BIN)/python -m knet_lightning $(ARGS)

# two test processes, one file each at a time (a file's module fixtures are built once): every
# test runs single-threaded (tests/conftest.py), so the 2 cores run two files side by side
XDIST ?= -n 2 --dist loadfile

# ruff's rules and format, configured in pyproject.toml
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the CI suite (slow tests excluded), after the lint
test: $(PEER_STAMP) $(BROWSER_STAMP) lint
	$(BIN)/python -m pytest -m "not slow" $(XDIST) --durations=25 $(PYTEST_ARGS)

# everything, slow tests included
test-all: $(PEER_STAMP) $(BROWSER_STAMP)
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# the documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or anchor, or a
# page outside the nav, fails (tests/test_docs.py runs the same build in CI)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(BIN)/python -m pip install -e '.[test,bench]'
	$(BIN)/python scripts/bench.py $(ARGS)

clean:
	rm -rf $(VENV) logs data/synthetic .pytest_cache site
