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
	# mamba-ssm and causal-conv1d's Python code without their CUDA builds (and without fetching a
	# prebuilt wheel from GitHub): tests/test_cuda_emulation.py runs the `cuda` backend through it,
	# with tests/kernel_stub standing in for the compiled extensions. Kept where the real kernels are.
	.venv/bin/python -c "import selective_scan_cuda" 2>/dev/null || { \
	  .venv/bin/pip install packaging wheel einops transformers && \
	  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
	  CAUSAL_CONV1D_FORCE_BUILD=TRUE .venv/bin/pip install --no-build-isolation --no-deps $(KERNELS); }
	touch $@

# the kernel sdists the emulation installs (inside the [cuda] extra's bounds)
KERNELS := mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0

# The real CUDA kernels, built against this venv's torch (docs/cuda.md: MAX_JOBS, fewer architectures)
cuda: .venv/.installed
	.venv/bin/pip install packaging wheel ninja
	.venv/bin/pip install --no-build-isolation --force-reinstall --no-deps $(KERNELS)
	.venv/bin/pip install --no-build-isolation -e '.[dev,cuda]'
	.venv/bin/python -c "import rmeeto.ops as o, torch; print(o.backend_summary('cuda'))"

.PHONY: setup demo test bench results cuda
setup: .venv/.installed

demo: .venv/.installed
	$(PY) demo.py

test: .venv/.installed
	$(PY) -m pytest -q

bench: .venv/.installed
	mkdir -p outputs/demo
	$(PY) benchmarks/bench_scan.py | tee outputs/demo/bench_scan.txt
	$(PY) benchmarks/bench_model.py | tee outputs/demo/bench_model.txt
	$(PY) benchmarks/bench_cpu.py | tee outputs/demo/bench_cpu.txt

# docs/results.md and its plots, from the outputs of `make demo` and `make bench`
results: .venv/.installed
	$(PY) scripts/results.py
