# The two commands of the README are `make reproduce` (the main job) and `make test` (the whole suite).
# Both create .venv and install the pinned stack when it is missing or out of date; both are idempotent.
SHELL := /bin/bash
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt settings.ini setup.py | md5sum | cut -c1-10)
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

SUDO  := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup browser test lint test-nbs test-py reproduce readme docs lab export clean

setup: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (mm_research)" >/dev/null
	-git rev-parse --git-dir >/dev/null 2>&1 && $(BIN)/nbdev_install_hooks >/dev/null
	rm -f $(VENV)/.installed-*
	touch $@

# Debian's Chromium for the docs-site browser test.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: setup browser lint test-nbs test-py

# Line length and no `;` statement chains, in the notebooks (the library is generated from them), tools and tests.
lint: setup
	$(BIN)/ruff check nbs tools tests benchmarks  # mm_research/ is generated from nbs/

# The library notebooks, two at a time, one math thread each: tiny models are overhead-bound and oversubscribed
# threads spin. The experiment notebooks run end to end in tests/test_docs.py instead (`mmr reproduce` through
# papermill, as a user runs them), not twice. Run folders go to a scratch folder, never the checkout's runs/.
test-nbs: setup
	scratch=$$(mktemp -d) && MMR_RUNS=$$scratch OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
	  $(BIN)/nbdev_test --n_workers 2 --timing --skip_folder_re '^([_.].*|experiments)$$'; rc=$$?; rm -rf $$scratch; \
	  exit $$rc

# Two workers (one per core), a test file per worker at a time: most tests drive a single-threaded kernel.
test-py: setup browser
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/pytest tests -q --durations=15 -n 2 --dist loadfile

reproduce: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/mmr reproduce -f reproduce.yaml --results results
	$(MAKE) readme

readme: setup
	$(BIN)/python tools/build_docs.py readme

docs: setup
	$(BIN)/python tools/build_docs.py docs

lab: setup
	$(BIN)/jupyter lab nbs

export: setup
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean

clean:
	rm -rf _proc _docs site runs
