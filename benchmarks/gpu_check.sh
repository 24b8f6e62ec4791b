#!/usr/bin/env bash
# One prepared GPU check, run through the device tool from a session that carries:
#   .whl/      wheels the GPU image lacks (bitsandbytes, rouge-score, nltk, pydantic) for its Python 3.12
#   .gpu-data/ a copy of MUSE-News' evaluation files (knowmem, verbmem, privleak)
# It exercises the CUDA path end to end: CUDA quantizer tests, the experiment grid on the GPU (bf16 evaluation,
# bitsandbytes NF4 / LLM.int8 on CUDA, RTN), and the evaluation benchmark on CUDA. Logs land in $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, transformers, peft, accelerate, bitsandbytes
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__,
      "bitsandbytes", bitsandbytes.__version__)
PY
echo "== CUDA quantizer tests" | tee "$OUT/tests.log"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/quant/test_cuda.py 2>&1 | tail -15 | tee -a "$OUT/tests.log"

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
echo "== grid" | tee "$OUT/grid.log"
start=$(date +%s)
timeout 300 python3 -m qrunlearn run /tmp/gpu-grid.yaml --out /tmp/gpu-run --no-progress 2>&1 | tail -40 | tee -a "$OUT/grid.log"
echo "grid wall seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/grid.log"
cp /tmp/gpu-run/report.md "$OUT/" 2>/dev/null
python3 - <<'PY' 2>&1 | tee "$OUT/cells.txt"
import json
r = json.load(open("/tmp/gpu-run/results.json"))
ref = r["references"]
print("references", round(ref["wall_seconds"], 1), "s")
for name, evals in ref["evals"].items():
    for p, e in evals.items():
        print("  ", name, p, e["settings"]["device"], {k: round(v, 2) for k, v in e["timings"].items()})
for c in r["cells"]:
    print(c["cell"], round(c["wall_seconds"], 1), "s; unlearn", round(c["unlearn"]["seconds"], 1), "s")
    for p, e in c["evals"].items():
        print("  ", p, e["settings"]["device"], {k: round(v, 2) for k, v in e["timings"].items()})
PY
echo "== eval benchmark (CUDA)" | tee "$OUT/bench_eval.log"
timeout 150 python3 benchmarks/bench_eval.py --device cuda --model /tmp/gpu-run/models/target \
  --data /tmp/gpu-run/data --batch-size 64 2>&1 | tail -15 | tee -a "$OUT/bench_eval.log"
timeout 120 python3 benchmarks/bench_eval.py --device cuda --model /tmp/gpu-run/models/target \
  --data .gpu-data/muse-news --limit 20 --batch-size 20 --retrain-auc 0.4772 2>&1 | tail -15 | tee -a "$OUT/bench_eval.log"
