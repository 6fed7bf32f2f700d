# The two commands: `make demo` (the main job on the embedded default) and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEVICES ?= 8
export XLA_FLAGS := --xla_force_host_platform_device_count=$(DEVICES)
export JAX_PLATFORMS ?= cpu
export TPU_SKIP_MDS_QUERY ?= 1

.PHONY: demo test lint format bench clean

TPU_STAMP := $(STAMP)-tpu

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# libtpu at the version the installed jax needs (an extra cannot read it): the tests compile the
# attention kernels and train steps for TPU slices on this CPU host. The demo does not need it.
$(TPU_STAMP): $(STAMP)
	$(BIN)/pip install --quiet "jax[tpu]==$$($(BIN)/python -c 'import jax; print(jax.__version__)')"
	touch $(TPU_STAMP)

demo: $(STAMP)
	$(BIN)/python -m train --config configs/demo.yaml --init-from configs/demo-base --run-dir runs/demo

test: $(TPU_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=1800 tests

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache
