"""``stage=doctor``: on this machine's CPU, and with fake npu-smi / nvidia-smi executables on PATH that print
the real fixtures (or variants of them), so the tool paths run for real. The JSON reports are read from the
stage run in this process; the table and a bad option go through the real CLI."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from tests import npu_smi_variants as variants
from tests.helpers import run_cli, run_in_process
from tests.test_smi import NVIDIA_TOPO


def _fake_tool(bin_dir, name, outputs: dict) -> None:
    """An executable ``name`` that prints ``outputs[args]`` (args joined by spaces; key "" for anything else)."""
    bin_dir.mkdir(exist_ok=True)
    cases = []
    for index, (args, text) in enumerate(outputs.items()):
        path = bin_dir / f"{name}-out{index}.txt"
        path.write_text(text)
        cases.append(f'  "{args}") cat "{path}" ;;' if args else f'  *) cat "{path}" ;;')
    script = bin_dir / name
    script.write_text("#!/bin/sh\ncase \"$*\" in\n" + "\n".join(cases) + "\nesac\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _env(bin_dir, **extra) -> dict:
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra}


_MACHINE_SETTINGS = ("ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME")
pytestmark = pytest.mark.skipif(
    any(name in os.environ for name in _MACHINE_SETTINGS),
    reason=f"these tests stage their own device settings; this shell sets some of {', '.join(_MACHINE_SETTINGS)}",
)


@pytest.fixture
def doctor(monkeypatch, capsys):
    """Run ``stage=doctor`` with these overrides in this process, in directory ``cwd`` with ``env`` set;
    returns its exit status and printed output as a CompletedProcess."""

    def run(*overrides, cwd, env=None):
        monkeypatch.chdir(cwd)
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        try:
            run_in_process("stage=doctor", *overrides)
            status = 0
        except SystemExit as exit:
            status = exit.code
        printed = capsys.readouterr()
        return subprocess.CompletedProcess(["stage=doctor", *overrides], status, printed.out, printed.err)

    return run


def _checks(result) -> dict:
    report = json.loads(result.stdout)
    return report, {check["name"]: check for check in report["checks"]}


def test_cpu_doctor_passes_and_writes_nothing(tmp_path, doctor):
    result = doctor("device=cpu", "doctor.format=json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report, checks = _checks(result)
    assert report["device"] == "cpu" and report["ok"] is True
    assert checks["cpu matmul"]["status"] == "ok" and "max relative error" in checks["cpu matmul"]["detail"]
    assert checks["bf16"]["status"] == "ok"
    assert checks["CPU cores"]["detail"].startswith(f"{os.cpu_count()} ")
    assert "GiB total" in checks["memory"]["detail"]
    assert list(tmp_path.iterdir()) == [], "the doctor must not create a run directory"


def test_npu_machine_with_a_sick_card_busy_card_and_pcie_links(tmp_path, npu_smi_texts, doctor):
    """Four 910B4 32 GB cards, NPU2 in Alarm, a process on NPU0, PCIe-only links: all found, exit 1."""
    info = variants.with_processes(
        variants.with_health(variants.as_910b4_32gb(variants.fewer_cards(npu_smi_texts["info"], 4)), 2, "Alarm"),
        [{"npu": 0, "pid": 4242, "name": "python3", "memory_mb": 20480}],
    )
    topo = variants.topology(variants.PCIE_ONLY_4, ["0-23", "0-23", "24-47", "24-47"], npu_smi_texts["topo"])
    _fake_tool(tmp_path / "bin", "npu-smi", {"info -t topo": topo, "": info})
    result = doctor("parallelism.nproc_per_node=4", "doctor.format=json", cwd=tmp_path,
                    env=_env(tmp_path / "bin", HCCL_CONNECT_TIMEOUT="600"))
    assert result.returncode == 1, result.stderr[-2000:]
    report, checks = _checks(result)
    assert report["device"] == "npu" and "npu-smi is on PATH" in report["reason"] and report["ok"] is False
    assert checks["npu-smi chips"]["detail"] == "4 x 910B4 (npu-smi 24.1.rc1.b030)"
    assert checks["health npu2"]["status"] == "fail" and "Alarm" in checks["health npu2"]["detail"]
    assert "npu-smi info -t health -i 2" in checks["health npu2"]["fix"]
    assert checks["HBM used/total MB"]["detail"].startswith("0: 3318/32768, 1: 3314/32768")
    assert checks["processes"]["status"] == "warn" and "pid 4242 python3 on 0 (20480 MB)" in checks["processes"]["detail"]
    assert checks["interconnect"]["status"] == "warn" and "NPU0-NPU3 SYS" in checks["interconnect"]["detail"]
    assert checks["visible devices"]["status"] == "ok" and "lists 4" in checks["visible devices"]["detail"]
    assert checks["HCCL settings"] == {"name": "HCCL settings", "status": "ok", "detail": "HCCL_CONNECT_TIMEOUT=600", "fix": None}
    assert checks["CANN environment"]["status"] == "fail" and "set_env.sh" in checks["CANN environment"]["fix"]
    assert [c["name"] for c in report["checks"] if c["status"] in ("warn", "fail") and not c["fix"]] == []
    assert len(report["tools"]["npu_smi_info"]["chips"]) == 4
    assert report["tools"]["npu_smi_topo"]["links"]["NPU1"]["NPU2"] == "PHB"


@pytest.mark.cli
def test_table_output_names_each_failure_and_its_fix(tmp_path, npu_smi_texts):
    _fake_tool(tmp_path / "bin", "npu-smi", {"info -t topo": npu_smi_texts["topo"], "": npu_smi_texts["info"]})
    result = run_cli("stage=doctor", "parallelism.nproc_per_node=4", cwd=tmp_path,
                     env=_env(tmp_path / "bin", ASCEND_RT_VISIBLE_DEVICES="0,1", HCCL_EXEC_TIMEOUT="soon"))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0] == "npu_recipes doctor: npu (device=auto: npu-smi is on PATH)"
    row = next(line for line in lines if line.startswith("visible devices"))
    assert "FAIL" in row and "ASCEND_RT_VISIBLE_DEVICES=0,1; parallelism.nproc_per_node=4" in row
    assert next(line for line in lines if line.startswith("interconnect")).split()[1] == "ok"
    assert next(line for line in lines if line.startswith("npu-smi chips")).endswith("8 x 910B3 (npu-smi 24.1.rc1.b030)")
    fixes = lines[lines.index("fixes:") + 1:]
    assert "  FAIL visible devices: pass parallelism.nproc_per_node=2 or fewer, or export ASCEND_RT_VISIBLE_DEVICES with 4 devices" in fixes
    assert "  FAIL HCCL settings: export HCCL_EXEC_TIMEOUT=<integer> or unset it" in fixes
    failed = [line for line in lines if "  FAIL  " in line]
    assert lines[-1] == f"{len(failed)} check(s) failed"
    assert len([line for line in fixes if line.startswith("  FAIL ")]) == len(failed)


def test_cuda_path_reads_nvidia_smi(tmp_path, doctor):
    gpus = "0, NVIDIA H200, 00000000:19:00.0, 1021, 143771, GPU-aaa\n1, NVIDIA H200, 00000000:3B:00.0, 4, 143771, GPU-bbb\n"
    _fake_tool(tmp_path / "bin", "nvidia-smi", {
        "--query-gpu=index,name,pci.bus_id,memory.used,memory.total,uuid --format=csv,noheader,nounits": gpus,
        "--query-compute-apps=gpu_uuid,pid,process_name,used_memory --format=csv,noheader,nounits": "",
        "topo -m": NVIDIA_TOPO,
    })
    result = doctor("device=cuda", "parallelism.nproc_per_node=2", "doctor.format=json",
                    cwd=tmp_path, env=_env(tmp_path / "bin", CUDA_VISIBLE_DEVICES="1,0"))
    report, checks = _checks(result)
    assert report["device"] == "cuda"
    assert checks["nvidia-smi chips"]["detail"] == "2 x NVIDIA H200"
    assert checks["interconnect"]["status"] == "ok" and "NV18" in checks["interconnect"]["detail"]
    assert checks["interconnect"]["detail"] == "links among all: NV18, SYS"
    assert checks["CPU affinity"] == {"name": "CPU affinity", "status": "ok", "detail": "NUMA Affinity: GPU1 0, GPU0 0 (one node)",
                                      "fix": None}
    assert checks["visible devices"]["status"] == "ok"
    assert checks["visible devices"]["detail"] == "CUDA_VISIBLE_DEVICES=1,0; parallelism.nproc_per_node=2"
    uuids = doctor("device=cuda", "parallelism.nproc_per_node=3", "doctor.format=json",
                   cwd=tmp_path, env=_env(tmp_path / "bin", CUDA_VISIBLE_DEVICES="GPU-aaa,GPU-bbb"))
    visible = _checks(uuids)[1]["visible devices"]
    assert visible["status"] == "fail" and visible["detail"].startswith("CUDA_VISIBLE_DEVICES=GPU-aaa,GPU-bbb;")
    import torch

    if not torch.cuda.is_available():
        assert result.returncode == 1
        assert checks["devices"]["status"] == "fail" and "sees no CUDA device" in checks["devices"]["detail"]


@pytest.mark.cli
def test_bad_doctor_format_is_a_user_error(tmp_path):
    result = run_cli("stage=doctor", "doctor.format=yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "doctor.format='yaml' is not valid" in result.stderr and "table, json" in result.stderr


def test_the_master_port_check_of_a_multi_node_run(monkeypatch):
    """Loopback only: a listener is reachable, a closed port on an answering host is fine before the
    job starts, a name nobody resolves fails with the fix (the resolver answers as for an unknown name,
    so no DNS query leaves the machine); one node checks nothing."""
    import socket

    from npu_recipes.config.schema import ParallelismConfig
    from npu_recipes.doctor import checks

    def checked(**settings):
        report = checks.Report("cpu", "device=cpu")
        checks.check_master_port(report, ParallelismConfig(name="ddp", **settings))
        return [(check.name, check.status, check.detail, check.fix) for check in report.checks]

    assert checked(nnodes=1) == []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert checked(nnodes=2, master_port=port) == [
            ("master port", "ok", f"127.0.0.1:{port} accepts connections (a node's rendezvous is up)", None)]
    assert checked(nnodes=2, master_port=port)[0][1:3] == (
        "ok", f"127.0.0.1 answers; nothing listens on port {port} yet (the first node to start opens it)")
    def unknown(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    name, status, detail, fix = checked(nnodes=2, master_addr="no-such-node.invalid", master_port=port)[0]
    assert status == "fail" and detail.startswith("cannot resolve parallelism.master_addr=no-such-node.invalid") and "MASTER_ADDR" in fix
    assert checked(nnodes=2)[0][1:3] == ("fail", "2 nodes and no parallelism.master_port")
