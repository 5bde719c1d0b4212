# recops — the README's two commands: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
PIN    := -c requirements/constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: install lint demo test bench clean

install: $(STAMP)

# Order matters: torch first and pinned (the CPU build on CPU hosts), then the fbgemm kernels, then
# torchrec without its deps (its metadata asks for the CUDA fbgemm-gpu), then the Triton server
# wheel without deps (it would pull its own client stack), then recops itself.
$(STAMP): setup.cfg requirements/constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIN) torch==2.13.0
	$(PIP) install $(PIN) fbgemm-gpu-cpu==1.8.0
	$(PIP) install $(PIN) --no-deps torchrec==1.8.0
	$(PIP) install $(PIN) --no-deps nvidia-pytriton==0.7.0
	$(PIP) install $(PIN) -e '.[cpu,test]'
	$(PY) -c "import torch, torchrec, fbgemm_gpu; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

demo: install
	$(VENV)/bin/recops demo

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q tests

# The peer libraries the benchmarks compare against (setup.cfg's bench extra; torch stays pinned).
bench: install
	$(PIP) install $(PIN) -e '.[cpu,test,bench]'
	$(PY) -c "import torch, lightgbm, sklearn, deepctr_torch; assert torch.__version__.startswith('2.13.0')"
	$(VENV)/bin/recops bench --results-dir bench/results

clean:
	rm -rf $(VENV) runs build *.egg-info
