# Two set-up commands: `make demo` and `make test`; each creates .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-fast install clean

install: $(STAMP)

# torch is pinned and installed first so pip takes the CPU wheel on disk instead of a CUDA build.
# The reference `dflash` package is our parity oracle; its declared deps would pull another torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps dflash==0.1.0
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" tests

demo: $(STAMP)
	$(PY) -m tools.demo

clean:
	rm -rf $(VENV) .pytest_cache
