"""The README's API example, run as written (a user's script, in a fresh process and folder)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import ROOT


def test_readme_api_example_runs_as_written(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## API"):]
    code = block[block.index("```python\n") + len("```python\n"):block.index("\n```", block.index("```python"))]
    assert "tq.convert(" in code and "tq.export(" in code and "to_onnx(" in code
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    (tmp_path / "example.py").write_text(code + "\nprint('api example ok')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "api example ok" in r.stdout
    assert (tmp_path / "runs" / "api" / "model.int8.npz").stat().st_size > 0
    assert (tmp_path / "runs" / "api" / "model.onnx").stat().st_size > 0
