# Two commands for a new user: `make demo` and `make test`. Each creates or reuses .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: demo test bench bench-quick lint docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build of torch first, pinned: an unpinned torch pulls several GB of CUDA packages
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	# litgpt, for the attention-capture tests on its models: without its dependencies, whose
	# huggingface-hub<1.4 pin conflicts with transformers 5 (its model needs only what [dev] brings)
	$(PY) -m pip install --quiet --no-deps litgpt==0.5.13
	# torchao, pinned: its float8 training runs on a CPU through torch's CPU _scaled_mm, so the torchao
	# backend is tested against the real library here (its speed needs a GPU)
	$(PY) -m pip install --quiet --no-deps torchao==0.18.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/gpt_stability.py

test: $(STAMP)
	$(PY) -m pytest -q

# the benchmarks compare with WeightWatcher: the bench extra, torch kept at the pinned CPU build
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet torch==2.13.0 -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks

bench-quick: $(BENCH_STAMP)
	$(PY) -m benchmarks --quick

# the documentation site: mkdocs-material, the API reference from the docstrings; --strict fails on any warning
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet torch==2.13.0 -e ".[dev,docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: $(STAMP)
	$(PY) -m ruff check lightning_stability tests benchmarks examples
	$(PY) -m mypy lightning_stability

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache site
