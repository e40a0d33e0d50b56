"""benchmarks/scale.py end to end at a toy size: it must keep producing a result file whose
figures mean something, since nobody runs a benchmark that silently broke."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "scale.py"


def test_scale_smoke(tmp_path: Path) -> None:
    # --no-pin: the test must pass on a one-CPU machine and next to other tests
    args = ["--devices", "1,2", "--rounds", "1", "--duration", "0.3", "--warmup", "0.1",
            "--windows", "2", "--dma-cycles", "1", "--no-pin", "--results-dir", str(tmp_path)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    files = list(tmp_path.glob("scale-*.json"))
    assert len(files) == 1, files
    assert f"results: {files[0]}" in proc.stdout
    result = json.loads(files[0].read_text())
    assert result["meta"]["devices"] == [1, 2]
    by_n = result["summary"]["by_devices"]
    assert set(by_n) == {"1", "2"}
    for n in ("1", "2"):
        read = result["rounds"][0][n]
        assert read["devices"] == int(n)
        assert read["replies"] > 10  # every connection got answers in the window
        assert 0.2 < read["window_s"] < 5
        # per message: more than nothing, less than the whole window per reply
        assert 0 < read["server_cpu_us_per_msg"] < 1e6 * read["window_s"] / read["replies"] * 2
        assert 0 < read["rtt_median_us"] <= read["rtt_p99_us"]
        assert 0 < read["server_busy"] <= 1.05 and 0 < read["client_busy"] <= 1.05
    ratio = result["summary"]["ratios"]["2_vs_1"]
    assert math.isfinite(ratio["server_cpu_per_msg"]) and ratio["server_cpu_per_msg"] > 0
    dma = result["dma"]
    assert (dma["devices"], dma["windows_per_device"]) == (2, 2)
    for variant in ("no_fd", "fd"):
        for kind in ("map", "unmap"):
            r = dma[variant][kind]
            assert len(r["median_us_by_block"]) == len(r["server_cpu_us_by_block"]) == 2
            assert r["first_block_median_us"] > 0 and r["server_cpu_us_first_block"] > 0
            assert math.isfinite(r["last_over_first"]) and r["last_over_first"] > 0
