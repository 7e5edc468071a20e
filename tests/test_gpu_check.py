"""The GPU check cannot rot: its CPU smoke runs every part end to end through the shell script.

``tests/benchmarks/gpu_check.sh --cpu-smoke`` is the same script a GPU machine runs (same
parts, processes and launchers: open_clip_train, clipline with and without compile, FSDP2
through ``accelerate launch`` with a checkpoint and ``--resume latest``, the loader and the
zero-shot benchmarks) at tiny sizes. Every row of the table must come back with figures.
"""

import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))

from gpu_check import ROWS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_cpu_smoke_prints_every_row_with_figures(tmp_path):
    res = subprocess.run(
        ["bash", "tests/benchmarks/gpu_check.sh", "--cpu-smoke", "--cache-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert "FAILED" not in out, out[-6000:]
    table = out[out.index("GPU check:") :]
    for label, (mine, theirs), _ in ROWS:
        line = next((ln for ln in table.splitlines() if ln.startswith(label + " ")), None)
        assert line is not None, f"no row {label!r} in:\n{table}"
        cells = line[len(label) :].split()
        # A figure where a part fills the cell, "-" where nothing does.
        for cell, part in zip(cells[:2], (mine, theirs), strict=True):
            if part is None:
                assert cell == "-", line
            else:
                assert re.fullmatch(r"[\d.]+%?|ok", cell), line
    assert "FSDP2 1 GPU: --resume latest" in table and " ok " in table, table
