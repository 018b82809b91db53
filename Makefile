PYTHON ?= python3
export PYTHON

.PHONY: setup demo test lint bench

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	bash scripts/test.sh

lint:
	$(PYTHON) -m ruff check hotbox_jupyter tests bench
	$(PYTHON) -m mypy

bench: setup
	for b in bench/*.py; do $(PYTHON) $$b || exit 1; done
