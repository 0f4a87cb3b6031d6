# `make demo` and `make test` are the README's two commands; both set up .venv/ on first use.
PY := .venv/bin/python
# pipefail: a failing benchmark fails `make bench` despite the tee
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -e '.[dev]'
	# deepspeed ships only an sdist: build it against the venv's torch instead of a fresh CUDA torch
	.venv/bin/pip install --no-build-isolation -e '.[dev,deepspeed]'
	touch $@

.PHONY: setup demo test bench results
setup: .venv/.installed

demo: .venv/.installed
	$(PY) demo.py

test: .venv/.installed
	$(PY) -m pytest -q

bench: .venv/.installed
	mkdir -p outputs/demo
	$(PY) benchmarks/bench_scan.py | tee outputs/demo/bench_scan.txt
	$(PY) benchmarks/bench_model.py | tee outputs/demo/bench_model.txt

# docs/results.md and its plots, from the outputs of `make demo` and `make bench`
results: .venv/.installed
	$(PY) scripts/results.py
