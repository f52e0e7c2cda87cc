"""scripts/fetch_data.sh: unpacks the Debian packages once and is a no-op afterwards."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from moerge.datasets import default_data_dir

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fetch_data.sh"
PACKAGES = ["r-cran-modeldata", "wordnet-base", "fortunes"]


def run_script(env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT)], capture_output=True, text=True, check=True, timeout=300, env=env
    )


def test_second_run_reports_every_package_present_and_changes_nothing():
    run_script()
    debian = default_data_dir() / "debian"
    before = {path: path.stat().st_mtime_ns for path in debian.rglob("*")}
    result = run_script()
    assert "nothing to do" in result.stdout
    for package in PACKAGES:
        assert f"present: {package}" in result.stdout
    assert {path: path.stat().st_mtime_ns for path in debian.rglob("*")} == before


def test_script_uses_moerge_data_dir_when_set(tmp_path):
    for package in PACKAGES:
        (tmp_path / "debian" / package).mkdir(parents=True)
        (tmp_path / "debian" / package / ".complete").write_text("test\n")
    result = run_script({**os.environ, "MOERGE_DATASETS_DIR": str(tmp_path)})
    assert f"nothing to do: all 3 packages are in {tmp_path}/debian" in result.stdout
