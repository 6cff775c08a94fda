"""Multi-process training through the real CLI: real torchrun, real DeepSpeed, 2 CPU processes over gloo.

Every torchrun + DeepSpeed start costs many seconds on 2 cores, so each (parallelism, train_type)
pair is trained once, for 10 steps, by a module-scoped fixture, and every assertion below reads
those runs. A single-process run of the same settings is DDP's reference; DDP is ZeRO's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from npu_recipes.data import demo
from tests.helpers import REPO, fixed_batch_logits, read_jsonl, run_cli, run_in_process

pytestmark = pytest.mark.slow

STEPS = 10
PARALLELISMS = ("ddp", "zero2", "zero3")
TRAIN_TYPES = ("lora", "full")
# The same global batch of 4 samples a step: one process accumulates 4 micro-batches of 1; two
# processes accumulate 2 each. fp32 and no dropout, so equal data must give equal losses.
COMMON = (
    "model=tiny_qwen2", "dataset=demo_math", "dataset.builder=null", "dataset.val_split_ratio=0", "device=cpu",
    f"train.max_steps={STEPS}", "train.logging_steps=1", "train.save_steps=100", "train.per_device_train_batch_size=1",
    "train.max_length=512", "train.seed=42", "model.torch_dtype=float32",
)
BY_TRAIN_TYPE = {
    "lora": ("train_type=lora", "train.learning_rate=1e-2", "lora.r=16", "lora.lora_dropout=0"),
    "full": ("train_type=full", "train.learning_rate=2e-3"),
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def variable_length_rows(tmp_path_factory) -> Path:
    """demo_math rows whose worked answer is repeated 1 to 4 times: 27 to about 160 labelled tokens a
    sample, so a per-device or per-micro-batch mean would weigh tokens differently from a global one."""
    rows = [json.loads(line) for line in _demo_lines(tmp_path_factory.mktemp("rows"), 64)]
    path = tmp_path_factory.mktemp("data") / "variable.jsonl"
    with open(path, "w") as handle:
        for index, row in enumerate(rows):
            row["output"] = " ".join([row["output"]] * (index % 4 + 1))
            handle.write(json.dumps(row) + "\n")
    return path


def _demo_lines(directory: Path, count: int) -> list[str]:
    demo.write(directory / "demo.jsonl", count)
    return (directory / "demo.jsonl").read_text().splitlines()


SECOND_NODE_ADDRESS = "127.0.0.2"
"""The master address of the two-"node" run: a loopback address other than 127.0.0.1 (which the
config refuses for several nodes, as a real cluster would need node 0's reachable address), so
test traffic never leaves 127.0.0.0/8; gloo is bound to the loopback interface (GLOO_SOCKET_IFNAME,
set for every test in conftest.py)."""


TWO_NODES = {("zero3", "lora"): "together", ("ddp", "lora"): "node 1 first"}
"""These pairs run as two one-process "nodes" on this machine, started with swift's multi-node variables
and master address 127.0.0.2 (the same world of two ranks as one node of two processes): ZeRO-3 with
both nodes started at the same instant, as srun or a PyTorchJob starts them, and DDP with node 1 started
first, waiting for node 0 to create the run directory. zero2-lora is their one-node reference."""


class Runs:
    """Each (parallelism, train_type) run, made on first use and kept for the module."""

    def __init__(self, root: Path, rows: Path):
        self.root, self.rows, self.results = root, rows, {}

    def get(self, parallelism: str, train_type: str):
        key = (parallelism, train_type)
        if key not in self.results:
            run = self.root / f"{parallelism}-{train_type}"
            overrides = [*COMMON, *BY_TRAIN_TYPE[train_type], f"dataset.path={self.rows}", f"output_dir={run}",
                         f"parallelism={parallelism}"]
            if parallelism == "single":
                # The one-process reference runs in this process: only its logged losses are compared.
                run_in_process(*overrides, "train.gradient_accumulation_steps=4")
                result = subprocess.CompletedProcess(overrides, 0)
            elif key in TWO_NODES:
                result = self._two_nodes(run, [*overrides, "train.gradient_accumulation_steps=2"], TWO_NODES[key])
            elif parallelism.startswith("zero"):
                # The seed's style: the process count comes from NPROC_PER_NODE.
                result = run_cli(*overrides, "train.gradient_accumulation_steps=2", f"parallelism.master_port={free_port()}",
                                 env={"NPROC_PER_NODE": "2"})
            else:
                result = run_cli(*overrides, "train.gradient_accumulation_steps=2", f"parallelism.master_port={free_port()}",
                                 "parallelism.nproc_per_node=2")
            assert result.returncode == 0, result.stderr[-4000:]
            self.results[key] = (run, result)
        return self.results[key]

    @staticmethod
    def _two_nodes(run: Path, overrides: list[str], order: str):
        """Start both nodes together, or node 1 first and node 0 once node 1 waits for the run directory;
        return both nodes' output (the rendezvous decides which node holds global rank 0)."""
        env = {**os.environ, "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": SECOND_NODE_ADDRESS,
               "MASTER_PORT": str(free_port()), "NPU_RECIPES_SAME_HOST_NODES": "1",
               # Both "nodes" share this machine's cores: one thread each, as torchrun sets for processes sharing a node.
               "OMP_NUM_THREADS": "1"}
        # Files, not pipes: a node must never block on a full pipe while the other waits for it in a collective.
        outputs = {node: (run.parent / f"{run.name}-node{node}.stdout", run.parent / f"{run.name}-node{node}.stderr")
                   for node in (0, 1)}
        nodes = {}

        def start(node: int) -> None:
            with open(outputs[node][0], "w") as stdout, open(outputs[node][1], "w") as stderr:
                nodes[node] = subprocess.Popen([sys.executable, "-m", "npu_recipes", *overrides], cwd=REPO,
                                               env={**env, "NODE_RANK": str(node)}, stdout=stdout, stderr=stderr)

        try:
            if order == "together":
                start(0)
                start(1)
            else:
                start(1)
                deadline = time.monotonic() + 600
                while "waiting up to" not in outputs[1][1].read_text():
                    assert nodes[1].poll() is None and time.monotonic() < deadline, outputs[1][1].read_text()[-4000:]
                    time.sleep(0.2)
                assert not run.exists(), "node 1 must not create the run directory"
                start(0)
            for node in (1, 0):
                nodes[node].wait(timeout=600)
        finally:
            for process in nodes.values():
                if process.poll() is None:
                    process.kill()
        text = {node: (outputs[node][0].read_text(), outputs[node][1].read_text()) for node in (0, 1)}
        assert nodes[1].returncode == 0, text[1][1][-4000:]
        assert all("--rdzv-backend=c10d" in text[node][1] for node in (0, 1))
        return subprocess.CompletedProcess(nodes[0].args, nodes[0].returncode, text[0][0] + text[1][0], text[0][1] + text[1][1])

    def losses(self, parallelism: str, train_type: str) -> list[float]:
        run, _ = self.get(parallelism, train_type)
        return [r["loss"] for r in read_jsonl(run / "logging.jsonl") if r["type"] == "train"]

    def summary(self, parallelism: str, train_type: str) -> dict:
        run, _ = self.get(parallelism, train_type)
        return read_jsonl(run / "logging.jsonl")[-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, variable_length_rows) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), variable_length_rows)


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / f"checkpoint-{STEPS}" / "adapter_model.safetensors")


@pytest.mark.parametrize("train_type", TRAIN_TYPES)
@pytest.mark.parametrize("parallelism", PARALLELISMS)
def test_two_process_run_saves_a_result_that_loads(runs, parallelism, train_type, tiny_model_path):
    import torch
    from transformers import AutoModelForCausalLM

    run, result = runs.get(parallelism, train_type)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["final_metrics"]["steps"] == STEPS
    assert manifest["launch"]["world_size"] == 2 and manifest["device"]["world_size"] == 2
    assert "-m npu_recipes.worker" in manifest["launch"]["command"] and f"{run}/resolved.yaml" in manifest["launch"]["command"]
    assert (run / "deepspeed.json").is_file() == parallelism.startswith("zero")
    # Rank 0 prints; rank 1 writes its own log in the run directory.
    assert result.stdout.count("run directory:") == 1
    assert result.stderr.count("trainable of") == 1
    if parallelism.startswith("zero") and (parallelism, train_type) not in TWO_NODES:
        # Quiet logs (issue 17): the op DeepSpeed builds on first use is named, and none of these appear.
        assert "DeepSpeed op deepspeed_shm_comm: compiling it unless" in result.stderr
        for noise in ("FutureWarning", "Setting accelerator to CPU", "Gradient accumulation steps mismatch"):
            assert noise not in result.stderr, noise
        assert result.stderr.count("npu_recipes.data.tokenize: dataset ") == 1
    assert "trainable of" in (run / "logs" / "rank1.log").read_text()
    summary = runs.summary(parallelism, train_type)
    assert summary["type"] == "summary" and len(summary["peak_memory_gib_per_rank"]) == 2
    assert summary["peak_memory_gib"] == max(summary["peak_memory_gib_per_rank"]) > 0

    checkpoint = run / f"checkpoint-{STEPS}"
    if train_type == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), checkpoint)
    else:
        assert (checkpoint / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape[-1] == 716 and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "parallelism,reference,train_type",
    [("ddp", "single", "full"), ("zero2", "ddp", "lora"), ("zero2", "ddp", "full"), ("zero3", "ddp", "lora"), ("zero3", "ddp", "full")],
)
def test_per_step_losses_equal_the_reference(runs, parallelism, reference, train_type):
    """Same seed, same global batch of variable-length samples: DDP equals one process, ZeRO equals DDP,
    step by step. Wrong sharding, accumulation, token averaging or a rank training alone breaks this.
    (DDP is held to one process with full fine-tuning only: one process launch fewer, and the
    stricter case, since every weight moves.)"""
    losses, expected = runs.losses(parallelism, train_type), runs.losses(reference, train_type)
    assert len(losses) == len(expected) == STEPS
    assert losses == pytest.approx(expected, abs=1e-3)
    assert losses[-1] < losses[0] - 0.1, "training must move the loss for the comparison to mean anything"
    # Tokens seen are counted over every rank (global tokens/s is computed from them).
    assert runs.summary(parallelism, train_type)["num_input_tokens_seen"] == runs.summary(reference, train_type)["num_input_tokens_seen"]


def test_zero3_lora_adapter_is_consolidated_to_full_shapes(runs, tiny_model_path):
    """Every LoRA tensor has the shape its base layer implies (A: r x in, B: out x r), is not all
    zeros, and equals DDP's adapter after the same 10 steps."""
    from transformers import AutoModelForCausalLM

    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_path).named_modules())
    zero3, ddp = _adapter(runs.get("zero3", "lora")[0]), _adapter(runs.get("ddp", "lora")[0])
    assert sorted(zero3) == sorted(ddp) and len(zero3) == 28  # 7 linear layers x 2 blocks x (A, B)
    rank = 16
    for name, tensor in zero3.items():
        layer = base[name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]]
        expected = (rank, layer.in_features) if ".lora_A." in name else (layer.out_features, rank)
        assert tuple(tensor.shape) == expected, name
        assert tensor.abs().sum() > 0, f"{name} is all zeros"
        assert (tensor - ddp[name]).abs().max() < 1e-3, name


@pytest.mark.parametrize("pair", list(TWO_NODES))
def test_two_nodes_share_one_run_directory(runs, pair):
    """swift's NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT become torchrun's c10d rendezvous, the same on each
    node; whether the nodes start together or node 1 first, node 0 alone creates the run directory, node 1
    joins it without rewriting it, and the losses equal those of the one-node run of two processes."""
    run, _ = runs.get(*pair)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["launch"]["nnodes"] == 2 and manifest["launch"]["world_size"] == 2
    assert "--rdzv-backend=c10d --rdzv-endpoint=127.0.0.2:" in manifest["launch"]["command"]
    assert (run / "logs" / "rank1.log").is_file() and not (run / "logs" / "rank0.log").exists()
    assert sorted(path.name for path in run.parent.iterdir() if path.is_dir() and path.name.startswith(run.name)) == [run.name]
    assert runs.losses(*pair) == pytest.approx(runs.losses("zero2", "lora"), abs=1e-3)


def test_zero3_full_checkpoint_holds_the_ddp_weights(runs):
    from safetensors.torch import load_file

    zero3 = load_file(runs.get("zero3", "full")[0] / f"checkpoint-{STEPS}" / "model.safetensors")
    ddp = load_file(runs.get("ddp", "full")[0] / f"checkpoint-{STEPS}" / "model.safetensors")
    assert sorted(zero3) == sorted(ddp)
    for name, tensor in zero3.items():
        assert tensor.shape == ddp[name].shape, name
        assert (tensor - ddp[name]).abs().max() < 1e-3, name


@pytest.mark.parametrize("parallelism", ["ddp", "zero3"])
def test_sigterm_saves_every_rank_and_the_rerun_equals_the_straight_run(runs, tmp_path, variable_length_rows, parallelism):
    """SIGTERM to the launching process reaches both workers through torchrun; they agree on one
    step, save it (ZeRO-3: each rank's partition), exit 143, and the same command run again ends
    with the straight run's losses and adapter (same world of two ranks, fp32)."""
    import psutil

    straight, _ = runs.get(parallelism, "lora")
    run = tmp_path / "run"
    command = [sys.executable, "-m", "npu_recipes", *COMMON, *BY_TRAIN_TYPE["lora"], f"dataset.path={variable_length_rows}",
               f"parallelism={parallelism}", "train.gradient_accumulation_steps=2", f"output_dir={run}"]
    environment = {**os.environ, "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())}
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        launcher = subprocess.Popen(command, cwd=REPO, env=environment, stdout=stdout, stderr=stderr)
        try:
            deadline = time.monotonic() + 600
            while not ((run / "logging.jsonl").is_file() and '"train"' in (run / "logging.jsonl").read_text()):
                assert launcher.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
                assert time.monotonic() < deadline, "training never logged a step"
                time.sleep(0.05)
            workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                       if "npu_recipes.worker" in " ".join(p.cmdline())]
            assert len(workers) == 2
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(timeout=300)
        finally:
            if launcher.poll() is None:
                launcher.kill()
    errors = (tmp_path / "stderr").read_text()
    assert launcher.returncode == 128 + signal.SIGTERM, errors[-3000:]
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"workers still running after the launcher exited: {[p.pid for p in alive]}"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "interrupted", errors[-3000:]
    stopped_at = manifest["stopped_at_step"]
    assert 1 <= stopped_at < STEPS
    checkpoint = run / f"checkpoint-{stopped_at}"
    assert f"npu_recipes: stopped by SIGTERM at step {stopped_at}; saved {checkpoint}" in errors
    assert errors.count("stopped by SIGTERM") == 1 and "Traceback" not in errors
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    if parallelism == "zero3":
        assert len(list(checkpoint.glob("global_step*/*optim_states.pt"))) == 2

    result = run_cli(*command[3:], env={"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"from checkpoint-{stopped_at} (step {stopped_at})" in result.stderr
    resumed = [r for r in read_jsonl(run / "logging.jsonl") if r["type"] == "train"]
    expected = [r for r in read_jsonl(straight / "logging.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in resumed] == [r["step"] for r in expected] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in expected], abs=1e-6)
    reference = _adapter(straight)
    for name, tensor in _adapter(run).items():
        assert (tensor - reference[name]).abs().max().item() <= 1e-6, name


def test_bad_input_found_by_the_workers_leaves_no_run_directory(tmp_path, variable_length_rows):
    """kernels=npu on a CPU: both workers refuse before their first step, the launcher exits 2 with
    one message, and nothing of the run is left (no logs/rank1.log, no deepspeed.json)."""
    run = tmp_path / "run"
    result = run_cli(*COMMON, "train_type=full", "parallelism=ddp", "parallelism.nproc_per_node=2", "kernels=npu",
                     f"dataset.path={variable_length_rows}", f"parallelism.master_port={free_port()}", f"output_dir={run}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "kernels=npu runs torch_npu's fused kernels on an Ascend NPU" in result.stderr and "Traceback" not in result.stderr
    assert not run.exists()


@pytest.fixture(scope="module")
def one_row_repeated(tmp_path_factory) -> Path:
    """16 copies of one demo_math row: every micro-batch is the same sample, so a run's weights depend only
    on how many updates it applied, not on which data each step drew."""
    row = _demo_lines(tmp_path_factory.mktemp("one-row"), 1)[0]
    path = tmp_path_factory.mktemp("data") / "one_row.jsonl"
    path.write_text((row + "\n") * 16)
    return path


def test_deepspeed_skips_a_nan_step_entirely(tmp_path, one_row_repeated, parallelism="zero3"):
    """Under ZeRO, DeepSpeed steps inside the backward; the NaN guard reads its skip. ZeRO-3 only: ZeRO-2
    takes the same path (``step_was_skipped`` after the engine's overflow check) and passed the same test
    when it was written; one stage keeps the suite inside its time. Two workers, NaN
    losses injected at steps 2 and 3 of 4, constant learning rate, one repeated sample: the adapter
    after step 4 equals that of a clean single-process run of 2 steps, so the two skipped steps
    changed neither weights nor optimizer state (Adam's moments and step count)."""
    common = (*COMMON, "train_type=lora", "train.learning_rate=1e-2", "lora.r=16", "lora.lora_dropout=0",
              "train.lr_scheduler_type=constant", f"dataset.path={one_row_repeated}")
    reference = tmp_path / "reference"
    run_in_process(*common, "train.max_steps=2", "train.gradient_accumulation_steps=2", f"output_dir={reference}")
    run = tmp_path / "run"
    result = run_cli(*common, "train.max_steps=4", "train.save_steps=1", "train.gradient_accumulation_steps=1",
                     "nan_guard.inject_nan_at_steps=[2,3]", f"parallelism={parallelism}", "parallelism.nproc_per_node=2",
                     f"parallelism.master_port={free_port()}", f"output_dir={run}")
    assert result.returncode == 0, result.stderr[-4000:]
    records = read_jsonl(run / "logging.jsonl")
    assert [(r["step"], r["reason"]) for r in records if r["type"] == "skipped_step"] == [(2, "non-finite loss"), (3, "non-finite loss")]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-4"]
    assert json.loads((run / "manifest.json").read_text())["final_metrics"]["skipped_steps"] == 2
    from safetensors.torch import load_file

    expected = load_file(reference / "checkpoint-2" / "adapter_model.safetensors")
    after = load_file(run / "checkpoint-4" / "adapter_model.safetensors")
    assert sorted(after) == sorted(expected)
    for name, tensor in after.items():
        assert (tensor - expected[name]).abs().max() < 1e-4, name
    before = load_file(run / "checkpoint-1" / "adapter_model.safetensors")
    assert max((after[name] - before[name]).abs().max() for name in after) > 1e-3, "step 4 must have trained"


def test_a_node_that_does_not_share_the_run_directory_is_refused_before_training(tmp_path, variable_length_rows):
    """Node 1 runs in its own mount namespace, where the runs folder is another directory (its own
    "disk") holding a stale copy of the run's resolved.yaml, so it joins at once; the workers compare
    the token node 0 wrote and every node stops with exit 2 before the first step, naming node 1 and the path."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm (a user and mount namespace) is not available here")
    runs, node1_disk = tmp_path / "runs", tmp_path / "node1-disk"
    run = runs / "run"
    overrides = [*COMMON, *BY_TRAIN_TYPE["lora"], f"dataset.path={variable_length_rows}", f"output_dir={run}",
                 "parallelism=ddp", "train.gradient_accumulation_steps=2"]
    runs.mkdir()
    (node1_disk / "run").mkdir(parents=True)
    from npu_recipes.config import compose, resolved

    stale = dataclasses.replace(compose.compose(overrides), output_dir=str(run))
    (node1_disk / "run" / "resolved.yaml").write_text(resolved.to_yaml(stale))
    env = {**os.environ, "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": SECOND_NODE_ADDRESS,
           "MASTER_PORT": str(free_port()), "NPU_RECIPES_SAME_HOST_NODES": "1", "OMP_NUM_THREADS": "1"}
    own_disk = f'mount --bind "{node1_disk}" "{runs}" && exec "$@"'
    commands = {0: [sys.executable, "-m", "npu_recipes", *overrides],
                1: ["unshare", "-rm", "sh", "-c", own_disk, "sh", sys.executable, "-m", "npu_recipes", *overrides]}
    nodes, outputs = {}, {node: tmp_path / f"node{node}.stderr" for node in (0, 1)}
    try:
        for node in (0, 1):
            with open(outputs[node], "w") as stderr:
                nodes[node] = subprocess.Popen(commands[node], cwd=REPO, env={**env, "NODE_RANK": str(node)},
                                               stdout=subprocess.DEVNULL, stderr=stderr)
        for node in (0, 1):
            nodes[node].wait(timeout=600)
    finally:
        for process in nodes.values():
            if process.poll() is None:
                process.kill()
    errors = {node: outputs[node].read_text() for node in (0, 1)}
    assert (nodes[0].returncode, nodes[1].returncode) == (2, 2), errors[0][-3000:] + errors[1][-3000:]
    message = f"node 1 (host {socket.gethostname()}) does not see the run directory node 0 writes: {run}/.shared-storage-check is missing there"
    assert message in errors[0] and message in errors[1], errors[0][-3000:] + errors[1][-3000:]
    assert "Traceback" not in errors[0] + errors[1]
    # Nothing trained, and node 0 removed the run it had created.
    assert not run.exists() and not (node1_disk / "run" / "logging.jsonl").exists()


def test_merge_of_a_zero3_lora_equals_base_plus_adapter(runs, tmp_path):
    """A LoRA trained under DeepSpeed ZeRO-3 (two processes over gloo: this module's two-node run) merges
    like a single-process one: merged logits equal base plus adapter within 1e-4."""
    run, _ = runs.get("zero3", "lora")
    checkpoint, merged = run / f"checkpoint-{STEPS}", tmp_path / "merged"
    run_in_process("stage=merge", "device=cpu", f"adapters={checkpoint}", "merge.torch_dtype=float32", f"merge.output_dir={merged}")
    with_adapter = fixed_batch_logits(f"adapters={checkpoint}")
    assert (with_adapter - fixed_batch_logits()).abs().max() > 0.05, "the ZeRO-3 LoRA should change the logits"
    assert (fixed_batch_logits("model=local", f"model.name_or_path={merged}") - with_adapter).abs().max() <= 1e-4
