# The README's two set-up commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install clean bench gptq-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, exactly pinned (a CPU wheel on this machine); the constraints file keeps it.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[quant,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qrunlearn run --out runs/demo --resume

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/bench_quant.py
	$(PY) benchmarks/bench_unlearn.py

# GPTQ tools (llmcompressor) downgrade transformers: they live in their own venv.
gptq-venv:
	test -x .venv-gptq/bin/python || $(PYTHON) -m venv .venv-gptq
	.venv-gptq/bin/python -m pip install --quiet torch==2.13.0
	.venv-gptq/bin/python -m pip install --quiet -c constraints.txt -e '.[gptq]'

clean:
	rm -rf $(VENV) .venv-gptq build *.egg-info
