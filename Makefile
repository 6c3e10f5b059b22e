# Two entry points: `make run` starts the daemon on an embedded default, `make test` runs
# every check CI runs. Both install what they need first, so they work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := qemu-utils qemu-system-common libnbd-bin python3-libnbd nbdkit fio

.PHONY: run test venv apt lint typecheck generate bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed
	@# Byte-compile explicitly: some environments set PYTHONDONTWRITEBYTECODE, and compiling
	@# every module at each start costs the daemon ~0.2 s (and the test suite minutes).
	@$(PY) -m compileall -q storage_daemon tests bench >/dev/null

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		export DEBIAN_FRONTEND=noninteractive; apt-get update -q && apt-get install -y -q $$missing; \
	fi

run: venv
	$(PY) -m storage_daemon.default_run

generate: venv
	$(PY) -m storage_daemon.qapi.gen
	$(PY) -m storage_daemon.help --man

lint: venv
	$(VENV)/bin/ruff check storage_daemon tests bench
	$(VENV)/bin/ruff format --check storage_daemon tests bench

typecheck: venv
	$(VENV)/bin/mypy

test: apt venv
	$(PY) -m storage_daemon.qapi.gen --check
	$(PY) -m storage_daemon.help --check
	$(MAKE) lint typecheck
	$(PY) -m pytest -q -p no:cacheprovider

bench: venv
	$(PY) bench/startup.py
	$(PY) bench/nbd_bench.py
