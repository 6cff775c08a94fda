#!/usr/bin/env bash
# The one prepared device check, for the first session lent an accelerator (a CUDA GPU through the
# device tool; an Ascend NPU where one is lent). One call, about 7 minutes, every result under $OUT:
#
#   1. environment.json: torch, CUDA/CANN, the device, varlen_attn's signature, the attention
#      `model.attn_implementation=auto` picks for packs, fused AdamW and bf16 support;
#   2. pytest.log / pytest.xml: tests/test_attention.py (packed rows equal each sample alone on the
#      device's kernels), tests/test_host_sync.py (on CUDA: no synchronising call in a quiet
#      training step, under torch.cuda.set_sync_debug_mode), tests/test_devices.py;
#   3. attention_kernels-*.json: per-sample SDPA against one varlen (and flex) call per layer on
#      Qwen2-7B attention shapes, forward + backward (bench/attention_kernels.py);
#   4. train_throughput.json: plain Trainer+PEFT (a), npu_recipes (b), Trainer with flattening (c) on
#      a random-init Qwen2-7B, 300 samples (bench/train_throughput.py).
#
# Before the call, from the checkout (pytest and hypothesis are not on the device's Python):
#   echo /.whl/ >> .git/info/exclude; mkdir -p .whl; cp ../shared/device/wheels/*.whl .whl/
#   .venv/bin/python -m pip download -q --no-deps -d .whl pytest pluggy iniconfig hypothesis sortedcontainers attrs
# and the call:  run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=540)
# Commit $OUT's files under bench/results/device_check/. Each step has its own time limit and the
# script goes on after a failed step; steps.json records every step's exit status and seconds.
# On this CPU (PYTHON=.venv/bin/python OUT=/tmp/dc bash bench/device_check.sh) the device parts skip.
set -u
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export TORCH_DEVICE_BACKEND_AUTOLOAD=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

steps=()
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log to $OUT/NAME.log, record status and seconds
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    steps+=("\"$name\": {\"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}")
    echo "$name: rc=$rc in $(( $(date +%s) - start )) s"
    tail -n 5 "$OUT/$name.log"
}

step environment 60 "$PYTHON" - "$OUT/environment.json" <<'EOF'
import json, sys
import torch
from npu_recipes.model import attention
from npu_recipes.run import manifest
from npu_recipes.runtime import devices

device = devices.resolve("auto")
varlen = attention.torch_varlen()
record = {
    "device": device.name(), "type": device.type, "versions": manifest.package_versions(),
    "cuda": torch.version.cuda, "bf16": device.supports_bf16(), "fused_adamw": device.runs_fused_adamw(),
    "varlen_signature": str(attention.varlen_call(varlen)) if varlen else None,
    "attention_for_packs": attention.choose("auto", device.type, True)._asdict(),
    "attention_unpacked": attention.choose("auto", device.type, False)._asdict(),
}
open(sys.argv[1], "w").write(json.dumps(record, indent=2) + "\n")
print(json.dumps(record, indent=2))
EOF
step pytest 180 "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_attention.py tests/test_host_sync.py \
    tests/test_devices.py --junitxml="$OUT/pytest.xml"
step attention_kernels 120 "$PYTHON" bench/attention_kernels.py
cp bench/results/attention_kernels-*.json "$OUT/" 2>/dev/null
step train_throughput 300 "$PYTHON" bench/train_throughput.py --samples 300 --output "$OUT/train_throughput.json"

( IFS=,; echo "{${steps[*]}}" ) >"$OUT/steps.json"
cat "$OUT/steps.json"
