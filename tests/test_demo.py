"""The README's first command, `make demo`, keeps working: embedded OpenBao, the provider as a
process, one Mount of the example class (a template among its objects), and a clean exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_mounts_the_example_class_and_cleans_up(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "demo"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "db.shop:5432:shop:shop:correct horse" in result.stdout
    assert "outcome=ok" in result.stderr + result.stdout
    assert not (tmp_path / "demo-output").exists()
