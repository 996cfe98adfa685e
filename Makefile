# Two set-up commands: `make demo` and `make test`; each creates .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-fast install ref-venv clean

REF_VENV  ?= .venv-ref
REF_STAMP := $(REF_VENV)/.installed-stamp

install: $(STAMP)

# The reference's dflash_generate needs transformers 5.15 (DynamicCache.activate_past_recording),
# which EasyDeL's transformers 5.5 is not: parity of the harness runs in this second venv.
ref-venv: $(REF_STAMP)

$(REF_STAMP):
	test -x $(REF_VENV)/bin/python || $(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/python -m pip install -q --upgrade pip
	$(REF_VENV)/bin/python -m pip install -q torch==2.13.0 'transformers==5.15.*' safetensors numpy
	$(REF_VENV)/bin/python -m pip install -q --no-deps dflash==0.1.0
	touch $(REF_STAMP)

# torch is pinned and installed first so pip takes the CPU wheel on disk instead of a CUDA build.
# The reference `dflash` package is our parity oracle; its declared deps would pull another torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps dflash==0.1.0
	touch $(STAMP)

test: $(STAMP) $(REF_STAMP)
	$(PY) -m pytest -q -ra --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" tests

demo: $(STAMP)
	$(PY) -m tools.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) $(REF_VENV) .pytest_cache
