"""The infer stage: the training run's validation split, GSM8K batches (in this process), the terminal chat and
refusals (through the real CLI)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from npu_recipes.config import compose
from npu_recipes.errors import UserError
from npu_recipes.infer import chat, generation
from npu_recipes.run import heldout
from npu_recipes.runtime import devices
from tests.helpers import load_for_generation, read_jsonl, run_cli, run_in_process

pytestmark = pytest.mark.slow

ROWS, HELD_OUT, SEED = 200, 10, 42
# The tiny model is barely trained, and greedy decoding on it repeats one token; a repetition
# penalty makes its replies varied, so comparing replies between two ways of generating means something.
VARIED = ("infer.max_new_tokens=12", "infer.repetition_penalty=3.0")


@pytest.fixture(scope="module")
def gsm8k_run(tmp_path_factory, gsm8k_dir):
    run = tmp_path_factory.mktemp("infer") / "run"
    run_in_process(
        "device=cpu", "dataset=gsm8k", f"dataset.path={gsm8k_dir / 'train.jsonl'}", f"dataset.max_samples={ROWS}",
        "dataset.val_split_ratio=0.05", f"train.seed={SEED}", "train.max_steps=6", "train.save_steps=6",
        "train.gradient_accumulation_steps=1", "train.learning_rate=1e-2", "train.max_length=512", f"output_dir={run}",
    )
    return run


@pytest.fixture(scope="module")
def checkpoint(gsm8k_run):
    return gsm8k_run / "checkpoint-6"


def _infer(*args):
    run_in_process("stage=infer", "device=cpu", *args)


def _latest_results(directory):
    results = sorted(directory.glob("*.jsonl"))
    assert len(results) == 1, results
    metrics = json.loads(results[0].with_suffix(".metrics.json").read_text())
    return read_jsonl(results[0]), metrics


@pytest.fixture(scope="module")
def adapter_results(checkpoint):
    _infer(f"adapters={checkpoint}", "load_data_args=true", *VARIED, "infer.batch_size=4")
    return _latest_results(checkpoint / "infer_result")


def test_load_data_args_evaluates_exactly_the_held_out_rows(gsm8k_run, gsm8k_dir, adapter_results):
    from datasets import load_dataset

    rows, metrics = adapter_results
    # Independently of npu_recipes: HF datasets' seeded split of the first 200 rows, 10 held out.
    source = load_dataset("json", data_files=str(gsm8k_dir / "train.jsonl"), split="train").select(range(ROWS))
    source = source.add_column("row_id", list(range(ROWS)))
    expected_ids = source.train_test_split(test_size=HELD_OUT, seed=SEED)["test"]["row_id"]
    recorded = json.loads((gsm8k_run / heldout.VALIDATION_ROWS).read_text())
    assert recorded["row_ids"] == expected_ids
    assert [row["row_id"] for row in rows] == expected_ids
    lines = (gsm8k_dir / "train.jsonl").read_text().splitlines()
    for row in rows:
        original = json.loads(lines[row["row_id"]])
        assert row["messages"] == [{"role": "user", "content": original["question"]}]
        assert row["reference"] == original["answer"]
        assert isinstance(row["response"], str) and 1 <= row["generated_tokens"] <= 12
    assert metrics["samples"] == HELD_OUT and metrics["training_run"] == str(gsm8k_run)
    assert metrics["accuracy"] == sum(row["correct"] for row in rows) / HELD_OUT


def test_merged_model_with_load_data_args_gives_the_adapter_replies(checkpoint, adapter_results):
    run_in_process("stage=merge", "device=cpu", f"adapters={checkpoint}")
    merged = checkpoint.with_name(checkpoint.name + "-merged")
    _infer(f"model.name_or_path={merged}", "load_data_args=true", *VARIED, "infer.batch_size=4")
    rows, metrics = _latest_results(merged / "infer_result")
    adapter_rows, _ = adapter_results
    assert [r["row_id"] for r in rows] == [r["row_id"] for r in adapter_rows]
    assert [r["response"] for r in rows] == [r["response"] for r in adapter_rows]
    assert metrics["training_run"] == str(checkpoint.parent) and metrics["adapters"] == []


def test_a_changed_split_is_refused(gsm8k_run, gsm8k_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(gsm8k_run, copy, ignore=shutil.ignore_patterns("infer_result", "*-merged"))
    resolved = yaml.safe_load((copy / "resolved.yaml").read_text())
    resolved["train"]["seed"] = SEED + 1
    (copy / "resolved.yaml").write_text(yaml.safe_dump(resolved))
    result = run_cli("stage=infer", "device=cpu", f"adapters={copy}/checkpoint-6", "load_data_args=true")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "differs from the 10 rows training held out" in result.stderr

    # Same ids, edited contents: a copy of the data with one held-out question changed.
    resolved["train"]["seed"] = SEED
    lines = (gsm8k_dir / "train.jsonl").read_text().splitlines()[:ROWS]
    first_held_out = json.loads((gsm8k_run / heldout.VALIDATION_ROWS).read_text())["row_ids"][0]
    edited = json.loads(lines[first_held_out])
    edited["question"] += " (edited)"
    lines[first_held_out] = json.dumps(edited)
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    resolved["dataset"]["path"] = str(tmp_path / "train.jsonl")
    (copy / "resolved.yaml").write_text(yaml.safe_dump(resolved))
    with pytest.raises(UserError, match="have the ids training held out but different contents"):
        heldout.rebuild(copy)


def test_batch_inference_over_the_first_50_gsm8k_test_rows(checkpoint, gsm8k_dir, tmp_path, capsys):
    _infer(f"adapters={checkpoint}", "dataset=gsm8k", f"dataset.path={gsm8k_dir / 'test.jsonl'}",
                    "infer.max_samples=50", "infer.max_new_tokens=16", "infer.batch_size=16", f"infer.result_dir={tmp_path}")
    rows, metrics = _latest_results(tmp_path)
    tests = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text().splitlines()[:50]]
    assert [row["row_id"] for row in rows] == list(range(50))
    assert [row["reference"] for row in rows] == [t["answer"] for t in tests]
    assert [row["reference_answer"] for row in rows] == [t["answer"].rsplit("#### ", 1)[1] for t in tests]
    assert metrics["samples"] == metrics["scored"] == 50
    assert metrics["correct"] == sum(row["correct"] for row in rows)
    assert metrics["accuracy"] == metrics["correct"] / 50
    assert metrics["answers_found"] == sum(row["prediction"] is not None for row in rows)
    assert metrics["generated_tokens"] == sum(row["generated_tokens"] for row in rows) > 0
    assert metrics["generation_config"]["do_sample"] is False
    printed = capsys.readouterr()
    assert f"accuracy:   {metrics['correct']}/50" in printed.out
    assert "generating: 100%" in printed.err


def test_left_padded_batches_give_each_prompt_its_own_reply(checkpoint):
    config = compose.compose(["device=cpu", f"adapters={checkpoint}", *VARIED])
    loaded = load_for_generation(config, devices.resolve("cpu"))
    gen_config = generation.for_infer(loaded, config.infer)
    prompts = [
        [{"role": "user", "content": "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts?"}],
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 6 * 7?"}],
    ]
    together = generation.generate(loaded, prompts, gen_config)
    alone = [generation.generate(loaded, [prompt], gen_config)[0] for prompt in prompts]
    assert together == alone
    assert len({reply.text for reply in alone}) == 3


def test_terminal_chat_keeps_history_until_cleared_and_quits(checkpoint):
    turns = ["Ava has 3 apples and gets 4 more. How many?", "And if she eats 2?"]
    after_clear = "Hi"
    result = run_cli("stage=infer", "device=cpu", f"adapters={checkpoint}", *VARIED,
                     input="\n".join([*turns, "/clear", after_clear, "/quit", "never answered"]) + "\n")
    assert result.returncode == 0, result.stderr[-3000:]
    replies = [segment.strip() for segment in result.stdout.split(chat.PROMPT)[1:]]
    # Segments: reply 1, reply 2, "(conversation cleared)", reply 3, then the /quit prompt (empty).
    assert replies[2] == "(conversation cleared)" and replies[4:] == [""]

    config = compose.compose(["device=cpu", f"adapters={checkpoint}", *VARIED])
    loaded = load_for_generation(config, devices.resolve("cpu"))
    gen_config = generation.for_infer(loaded, config.infer)
    first = generation.generate(loaded, [[{"role": "user", "content": turns[0]}]], gen_config)[0].text
    second = generation.generate(loaded, [[{"role": "user", "content": turns[0]}, {"role": "assistant", "content": first},
                                           {"role": "user", "content": turns[1]}]], gen_config)[0].text
    fresh = generation.generate(loaded, [[{"role": "user", "content": after_clear}]], gen_config)[0].text
    without_history = generation.generate(loaded, [[{"role": "user", "content": turns[1]}]], gen_config)[0].text
    assert second != without_history, "the second turn must depend on the first for this test to show history"
    assert replies[:2] == [first, second]
    assert replies[3] == fresh

def test_load_data_args_without_a_training_run_says_what_to_pass():
    result = run_cli("stage=infer", "device=cpu", "load_data_args=true")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "load_data_args=true needs the training run behind the model" in result.stderr
