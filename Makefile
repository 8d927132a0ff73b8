# Two commands for a new user: `make demo` (install, then the API and the patient UI with built-in defaults) and
# `make test`. The demo's private Ray gets token auth with a random token per start (RAY_AUTH_MODE unset);
# Ctrl-C stops everything it started and exits 0.
VENV ?= $(HOME)/.cache/attune-venv
export ATTUNE_VENV := $(VENV)
export HF_HUB_OFFLINE := 1
ACT := . $(VENV)/bin/activate &&

.PHONY: install test test-fast demo

install:
	bash scripts/bootstrap.sh

test: install
	$(ACT) python -m pytest -q -rs --durations=15 tests

test-fast: install
	$(ACT) python -m pytest -q -m "not slow and not integration" tests

demo: install
	$(ACT) attune adapters verify && $(ACT) attune serve --ui
