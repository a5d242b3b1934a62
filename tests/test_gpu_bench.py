"""benchmarks.gpu, the accelerator check, run small on the CPU: it trains in both compute
dtypes and finds the whole loop on one mesh equal to 8 devices on a 4 x 2 mesh."""

import json

from benchmarks import gpu, report


def test_the_accelerator_check_runs_and_finds_the_meshes_equal(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    result = gpu.main(["--batch", "128", "--steps", "4", "--equality-steps", "4",
                       "--json", str(out)])
    assert json.loads(out.read_text())["equality"] == result["equality"]
    for dtype in ("float32", "bfloat16"):
        run = result["throughput"][dtype]
        assert "error" not in run, run
        assert run["compute_dtype"] == dtype and run["steps"] == 4 and run["examples_per_sec"] > 0
    assert result["bf16_speedup"] > 0
    equality = result["equality"]
    assert equality["cpu8"]["mesh"] == {"data": 4, "model": 2}
    assert equality["accelerator"]["mesh"]["model"] == 1
    assert len(equality["accelerator"]["losses"]) == 4
    assert equality["equal"] and equality["max_loss_diff"] <= 1e-4
    text = report.gpu_table(result)
    assert "float32" in text and "bfloat16" in text and "within the tolerance" in text


def test_a_failed_run_is_named_and_the_others_still_report():
    result = gpu.run(["model.no_such_field=1"])
    assert "no_such_field" in result["error"]
