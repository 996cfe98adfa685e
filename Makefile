# Two set-up commands: `make demo` and `make test`; each creates .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-fast install ref-venv tpu-venv tpuinf-venv clean

REF_VENV  ?= .venv-ref
# Bumped whenever the recipe changes, so existing reference venvs (and CI's) are rebuilt.
REF_STAMP := $(REF_VENV)/.installed-stamp-2

TPU_VENV    ?= .venv-tpu
TPU_STAMP   := $(TPU_VENV)/.installed-stamp
LIBTPU_SPEC ?= libtpu==0.0.37.*

TPUINF_VENV  ?= .venv-tpuinf
TPUINF_STAMP := $(TPUINF_VENV)/.installed-stamp

install: $(STAMP)

# The reference's dflash_generate needs transformers 5.15 (DynamicCache.activate_past_recording),
# which EasyDeL's transformers 5.5 is not: parity of the harness runs in this second venv.
# vLLM's `speculators` (the speculators-format and loss-parity oracle) lives here too, --no-deps
# so that its torchvision/torchaudio/CUDA pins never replace the CPU torch; the deps listed are
# the ones `speculators.models.dflash` and its z-lab converter import.
ref-venv: $(REF_STAMP)

$(REF_STAMP):
	test -x $(REF_VENV)/bin/python || $(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/python -m pip install -q --upgrade pip
	$(REF_VENV)/bin/python -m pip install -q torch==2.13.0 'transformers==5.15.*' safetensors numpy
	$(REF_VENV)/bin/python -m pip install -q --no-deps dflash==0.1.0
	$(REF_VENV)/bin/python -m pip install -q openai loguru pydantic pydantic-settings \
		'datasets==5.1.0' hs-connectors==0.9.0
	$(REF_VENV)/bin/python -m pip install -q --no-deps speculators==0.9.0
	$(REF_VENV)/bin/python -c "import speculators.models.dflash, speculators.convert.dflash"
	touch $(REF_STAMP)

# .venv + libtpu (the build jax[tpu]==0.9.2 pins), for compiling TPU programs ahead of time on
# any machine (tools.tpu_compile). Separate because with libtpu importable every JAX process
# probes for a TPU; it holds only libtpu and a .pth adding .venv's site-packages (no second
# install of the stack). LIBTPU_SPEC may name a downloaded wheel instead.
tpu-venv: $(TPU_STAMP)

$(TPU_STAMP): $(STAMP)
	test -x $(TPU_VENV)/bin/python || $(PY) -m venv --without-pip $(TPU_VENV)
	$(PY) -m pip install -q --no-deps --upgrade \
		--target "$$($(TPU_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" '$(LIBTPU_SPEC)'
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
		> "$$($(TPU_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/dflash_main_venv.pth"
	touch $(TPU_STAMP)

# vLLM TPU's DFlash code (tpu-inference 0.32.0), the oracle of tests/test_tpu_inference.py.
# --no-deps like .venv-tpu, on .venv's jax/flax/torch through a .pth: its own pins (jax 0.11.2,
# flax 0.12.10, tokamax, qwix) need Python >= 3.12 and vllm is a CUDA build; what its DFlash
# modules import from those is stood in by tests/_tpu_inference_standins.py. transformers
# >= 5.8 is its requirement (its configs are read with transformers 5 semantics). The wheel
# also installs top-level `tests` and `tools` packages, removed so they can shadow nothing.
tpuinf-venv: $(TPUINF_STAMP)

$(TPUINF_STAMP): $(STAMP)
	test -x $(TPUINF_VENV)/bin/python || $(PY) -m venv --without-pip $(TPUINF_VENV)
	$(PY) -m pip install -q --no-deps --upgrade \
		--target "$$($(TPUINF_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
		tpu-inference==0.32.0 torchax==0.0.13 'transformers==5.15.*'
	rm -rf "$$($(TPUINF_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"/tests \
		"$$($(TPUINF_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"/tools
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
		> "$$($(TPUINF_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/dflash_main_venv.pth"
	cd tests && JAX_PLATFORMS=cpu ../$(TPUINF_VENV)/bin/python -c "import _tpu_inference_standins as s; \
		s.install(); import tpu_inference.models.jax.dflash, tpu_inference.spec_decode.jax.dflash"
	touch $(TPUINF_STAMP)

# torch is pinned and installed first so pip takes the CPU wheel on disk instead of a CUDA build.
# The reference `dflash` package is our parity oracle; its declared deps would pull another torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps dflash==0.1.0
	touch $(STAMP)

test: $(STAMP) $(REF_STAMP) $(TPU_STAMP) $(TPUINF_STAMP)
	$(PY) -m pytest -q -ra --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" tests

demo: $(STAMP)
	$(PY) -m tools.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) $(REF_VENV) $(TPU_VENV) $(TPUINF_VENV) .pytest_cache
