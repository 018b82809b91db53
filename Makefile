# The README's two commands: `make demo` and `make test`. Both run scripts/setup.sh first, which
# installs and starts whatever is missing (as root on Debian 12) and is quick when nothing is.
PYTHON ?= python3
export PYTHON
# setup.sh makes .venv when $(PYTHON) cannot install packages (Debian's externally managed python3);
# recursive (=) so that it is looked up after setup has run.
PY = $(shell [ -x .venv/bin/python ] && echo .venv/bin/python || echo $(PYTHON))

.PHONY: setup demo test lint bench doctor soak

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	bash scripts/test.sh

# 1000 tasks through the API, and 200 cells through each sandbox kernel (make test runs 100 and 30).
soak: setup
	HOTBOX_SOAK_TASKS=1000 HOTBOX_SOAK_CELLS=200 bash scripts/test.sh tests/integration/test_soak.py \
		tests/kernel/test_kernel_soak.py -s

doctor:
	$(PY) -m hotbox_jupyter.cli doctor

lint:
	$(PY) -m ruff check hotbox_jupyter tests $(wildcard bench)
	$(PY) -m mypy

# Every bench/*.py program in turn, then bench/results/bench.{json,md}; BENCH="--quick" is the short
# version, BENCH="--only box_start,magic_latency" a subset (see bench/run.py).
bench: setup
	$(PY) bench/run.py $(BENCH)
