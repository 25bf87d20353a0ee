# Every target sets up .venv by itself on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-kohya-pins lint bench bench-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so that nothing pulls a CUDA build.
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lycoft.demo --out demo_out

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	# One worker per core; a test file stays on one worker (its module fixtures are built once).
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

# The versions kohya sd-scripts pins (its requirements.txt): lycoft must install and work there.
KOHYA_VENV := .venv-kohya
KOHYA_PINS := "transformers==4.54.*" "diffusers==0.32.*" "accelerate==1.6.*"
KOHYA_TESTS := tests/test_kohya.py tests/test_network.py tests/test_formats_lycoris.py \
	tests/test_checkpoints_tiny.py tests/test_checkpoints_loading.py

$(KOHYA_VENV)/.installed: pyproject.toml Makefile
	test -x $(KOHYA_VENV)/bin/python || $(PYTHON) -m venv $(KOHYA_VENV)
	$(KOHYA_VENV)/bin/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(KOHYA_VENV)/bin/python -m pip install --quiet $(KOHYA_PINS) pytest pytest-timeout lycoris-lora -e .
	touch $@

test-kohya-pins: $(KOHYA_VENV)/.installed
	$(KOHYA_VENV)/bin/python -m pytest -p no:cacheprovider $(KOHYA_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench-quick: $(STAMP)
	$(PY) bench/layers.py --quick

bench: $(STAMP)
	$(PY) bench/layers.py

clean:
	rm -rf $(VENV) $(KOHYA_VENV) demo_out .pytest_cache .import_linter_cache
