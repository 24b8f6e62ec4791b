#!/usr/bin/env bash
# One prepared GPU check (CUDA path, bf16 evaluation, bitsandbytes on the GPU), run through the device tool:
#   the lead's session carried .whl/ (bitsandbytes, rouge-score, pydantic wheels for the GPU image's Python)
# Writes logs and the grid's outputs under $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, transformers, peft, accelerate, bitsandbytes
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__,
      "bitsandbytes", bitsandbytes.__version__)
PY
cat > /tmp/gpu-grid.yaml <<'YAML'
name: gpu-check
seed: 0
data: {synth: {size: small, seed: 0}}
models: {size: small}
methods: [ga_gdr, npo_klr]
adapters: [full, lora]
precisions: [fp, int8, nf4, rtn:w4g64]
eval: {batch_size: 64, bootstrap: 1000}
YAML
start=$(date +%s)
python3 -m qrunlearn run /tmp/gpu-grid.yaml --out /tmp/gpu-run --no-progress 2>&1 | tee "$OUT/grid.log" | tail -40
echo "grid wall seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/grid.log"
cp /tmp/gpu-run/table.md /tmp/gpu-run/report.md "$OUT/" 2>/dev/null
python3 - <<'PY' 2>&1 | tee "$OUT/cells.txt"
import json
r = json.load(open("/tmp/gpu-run/results.json"))
for c in [r["references"]] + r["cells"]:
    print(c["cell"], round(c["wall_seconds"], 1), "s")
    for p, e in c["evals"].items():
        if isinstance(e, dict) and "settings" in e:
            print("  ", p, e["settings"].get("device"), {k: round(v, 1) for k, v in e["timings"].items()})
        else:
            for pp, ee in e.items():
                print("  ", p, pp, ee["settings"].get("device"), {k: round(v, 1) for k, v in ee["timings"].items()})
PY
