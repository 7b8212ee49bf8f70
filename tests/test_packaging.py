"""The package installs `callbacks/` and `datamodules/` inside the `prehab` namespace, editable and as a wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_editable_install_maps_namespaces():
    import prehab
    import prehab.callbacks
    import prehab.datamodules

    public = {"LowRankLinear", "PrehabModule", "save_compressed", "load_compressed", "load_from_checkpoint"}
    assert public <= set(prehab.__all__) and all(hasattr(prehab, name) for name in public)
    assert {"SVD", "SVDLLM", "AASVD", "SAESSVD", "LowRankCompression"} <= set(prehab.callbacks.__all__)

    assert Path(prehab.callbacks.__file__).parent == REPO / "callbacks"
    assert Path(prehab.datamodules.__file__).parent == REPO / "datamodules"


def test_wheel_imports_from_outside_the_repo(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    if build.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{build.stderr[-2000:]}")
    wheel = next(tmp_path.glob("prehab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "prehab/callbacks/svd_llm.py" in names and "prehab/datamodules/__init__.py" in names
    assert {"prehab/tasks/prehab_rte.yaml", "prehab/tasks/prehab_sst2.yaml", "prehab/tasks/loaders.py",
            "prehab/tasks/prehab_mrpc_completion.yaml"} <= set(names)
    assert not any(n.startswith(("callbacks/", "datamodules/", "tests/")) for n in names)  # no generic top-level names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import prehab, prehab.callbacks, prehab.datamodules; print(prehab.callbacks.__file__)"
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(str(site / "prehab" / "callbacks"))
