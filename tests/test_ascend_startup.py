"""An Ascend machine whose CANN environment is not sourced: torch_npu installed, but it cannot load.

The stand-in is what such a machine has: a ``torch_npu`` package that raises on import (as the real one
does when CANN's libraries are not on the library path) and registers itself for torch's device-backend
autoloading (the ``torch.backends`` entry point group, torch >= 2.5). Plain ``import torch`` then dies
inside torch; every command of ours must still start and name the fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.cli

LOAD_FAILURE = "libhccl.so: cannot open shared object file: No such file or directory"


@pytest.fixture(scope="module")
def broken_torch_npu(tmp_path_factory) -> dict:
    """An environment whose Python finds the failing stand-in torch_npu (and its autoload entry point) first."""
    site = tmp_path_factory.mktemp("site")
    (site / "torch_npu").mkdir()
    (site / "torch_npu" / "__init__.py").write_text(f"raise ImportError({LOAD_FAILURE!r})\n")
    info = site / "torch_npu-2.13.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.13.0\n")
    (info / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "TORCH_DEVICE_BACKEND_AUTOLOAD")}
    environment["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    return environment


def test_the_stand_in_breaks_a_plain_import_torch(broken_torch_npu):
    """The premise: without our entry points, `import torch` itself fails on this machine."""
    result = subprocess.run([sys.executable, "-c", "import torch"], env=broken_torch_npu, capture_output=True, text=True)
    assert result.returncode != 0
    assert "Failed to load the backend extension: torch_npu" in result.stderr


def test_device_npu_names_set_env_sh_in_one_block(broken_torch_npu, tmp_path):
    result = run_cli("model=tiny_qwen2", "device=npu", f"output_dir={tmp_path / 'run'}", env=broken_torch_npu)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "npu_recipes: error: torch_npu is installed but failed to import" in result.stderr
    assert LOAD_FAILURE in result.stderr and "set_env.sh" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_doctor_runs_and_reports_the_failed_import_with_its_fix(broken_torch_npu):
    result = run_cli("stage=doctor", "doctor.format=json", env=broken_torch_npu)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}
    assert checks["import torch_npu"]["status"] == "fail" and "set_env.sh" in checks["import torch_npu"]["fix"]
    assert checks["torch"]["status"] == "ok"


def test_a_cpu_run_starts(broken_torch_npu, tmp_path):
    """device=cpu never touches torch_npu: the tokenizer, the planner and torch all load."""
    result = run_cli("model=tiny_qwen2", "device=cpu", "stage=plan", env=broken_torch_npu)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "device=cpu: ignoring the installed torch_npu in this run" in result.stderr and "Traceback" not in result.stderr
