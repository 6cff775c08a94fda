#!/usr/bin/env bash
# lm-evaluation-harness against the serve stage, end to end, without network.
#
#   bench/eval_client.sh [serve overrides ...]            e.g. bench/eval_client.sh device=cpu
#   LIMIT=40 CONCURRENCY=8 bench/eval_client.sh device=cpu adapters=RUN/checkpoint-30
#
# Starts `python -m npu_recipes stage=serve` on a free loopback port with the given overrides, writes
# two local lm-eval tasks over generated demo_math problems (npu_recipes.data.demo, no download):
#   npu_recipes_demo_math_mc   multiple choice by log-likelihood  -> lm-eval's local-completions
#                              (token-id prompts, echo + logprobs, max_tokens 1, a seed per request)
#   npu_recipes_demo_math_gen  generate-until with five stop strings -> local-chat-completions
# runs both with every Hugging Face hub switched offline (the tokenizer is the served model's
# local directory), prints lm-eval's tables, writes its JSON under OUT (default
# bench/results/eval_client/), and stops the server. Needs `pip install lm-eval` (0.4.13 tested).
set -euo pipefail

PY=${PYTHON:-python}
LIMIT=${LIMIT:-40}
CONCURRENCY=${CONCURRENCY:-8}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$HERE/results/eval_client}
WORK=$(mktemp -d)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=${PYTHONPATH:-$HERE/..}
SERVER=""
cleanup() {
    if [ -n "$SERVER" ] && kill -0 "$SERVER" 2>/dev/null; then kill -TERM "$SERVER"; wait "$SERVER" || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PY" -m npu_recipes stage=serve serve.port="$PORT" serve.host=127.0.0.1 "$@" > "$WORK/server.log" 2>&1 &
SERVER=$!
BASE=http://127.0.0.1:$PORT
for _ in $(seq 600); do
    if "$PY" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$BASE" 2>/dev/null; then break; fi
    if ! kill -0 "$SERVER" 2>/dev/null; then cat "$WORK/server.log"; echo "eval_client: the server did not start" >&2; exit 1; fi
    sleep 1
done

# The served model's id and its local directory (lm-eval tokenizes the log-likelihood prompts itself).
read -r MODEL TOKENIZER < <("$PY" - "$BASE" "$@" <<'EOF'
import json, sys, urllib.request
from npu_recipes.config import compose
from npu_recipes.infer import adapters
from npu_recipes.model import pretrained
health = json.loads(urllib.request.urlopen(sys.argv[1] + "/health").read())
config = compose.compose(["stage=serve", *sys.argv[2:]])
base = adapters.base_model_config(config.model, adapters.parse_adapters(config.adapters))
print(health["models"][-1], pretrained.resolve_path(base))
EOF
)

mkdir -p "$WORK/tasks" "$OUT"
"$PY" - "$WORK/tasks" <<'EOF'
import json, random, sys
from pathlib import Path
from npu_recipes.data import demo
folder = Path(sys.argv[1])
rows = demo.generate(200, seed=2026)
rng = random.Random(0)
with open(folder / "mc.jsonl", "w") as mc, open(folder / "gen.jsonl", "w") as gen:
    for row in rows:
        answer = int(row["answer"])
        choices = sorted({answer, answer + 1, max(0, answer - 2), answer + 10} | {answer + 3})[:4]
        if answer not in choices:
            choices[-1] = answer
        rng.shuffle(choices)
        mc.write(json.dumps({"question": row["input"], "choices": [str(c) for c in choices], "label": choices.index(answer)}) + "\n")
        gen.write(json.dumps({"question": row["input"], "answer": row["answer"]}) + "\n")
(folder / "npu_recipes_demo_math_mc.yaml").write_text(f"""task: npu_recipes_demo_math_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
""")
(folder / "npu_recipes_demo_math_gen.yaml").write_text(f"""task: npu_recipes_demo_math_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}} Answer with the number."
doc_to_target: answer
generation_kwargs:
  until: ["\\n\\n", "Question:", "<|im_end|>", "###", "Explanation:"]
  max_gen_toks: 24
  do_sample: false
filter_list:
  - name: last_number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
""")
EOF

COMMON=(--include_path "$WORK/tasks" --limit "$LIMIT" --output_path "$OUT" --log_samples)
"$PY" -m lm_eval --model local-completions \
    --model_args "model=$MODEL,base_url=$BASE/v1/completions,tokenizer=$TOKENIZER,tokenizer_backend=huggingface,num_concurrent=$CONCURRENCY,max_retries=1,tokenized_requests=True" \
    --tasks npu_recipes_demo_math_mc "${COMMON[@]}"
"$PY" -m lm_eval --model local-chat-completions --apply_chat_template \
    --model_args "model=$MODEL,base_url=$BASE/v1/chat/completions,num_concurrent=$CONCURRENCY,max_retries=1" \
    --tasks npu_recipes_demo_math_gen "${COMMON[@]}"
echo "eval_client: server's /health batches: $("$PY" -c "import urllib.request, sys, json; print(json.loads(urllib.request.urlopen(sys.argv[1] + '/health').read())['batches'])" "$BASE")"
