# Local development. Every target first makes .venv ready (local/bootstrap.sh).
.PHONY: bootstrap run test lint bench clean distclean

VENV := .venv
PYTHON := $(VENV)/bin/python

bootstrap:
	@bash local/bootstrap.sh

# The whole backend on 127.0.0.1: Firestore emulator, Secret Manager stand-in,
# Tiki simulator and the functions. Ctrl-C stops it all.
run: bootstrap
	$(PYTHON) -m local.stack

# The prerequisite check first, so a missing Java or emulator says what to
# install instead of failing test by test; then lint and types, then the suite.
test: bootstrap
	@$(PYTHON) -m local.stack --check >/dev/null
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy auth main.py local
	$(PYTHON) -m pytest -q

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy auth main.py local

# Cold start, latency and memory of one real instance, against stated targets.
bench: bootstrap
	@$(PYTHON) -m local.stack --check >/dev/null
	$(PYTHON) -m local.bench

# Logs and caches; distclean also removes the virtualenv.
clean:
	rm -rf .local .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
