"""The throughput benchmark runs end to end on the tiny shape (the figures themselves live in benchmarks/results)."""
import json

from conftest import import_benchmark


def test_throughput_benchmark_times_both_frameworks_and_writes_its_ratio(tmp_path):
    throughput = import_benchmark("throughput")
    out = tmp_path / "tp.json"
    assert throughput.main(["--shape", "tiny", "--batch", "4", "--precision", "fp32", "--warmup", "1", "--steps", "1",
                            "--reps", "2", "--open-clip-foreach", "--out", str(out)]) == 0  # in-process: no re-exec
    result = json.loads(out.read_text())
    run = result["runs"][0]
    assert set(run["frameworks"]) == {"open_clip", "open_clip_foreach", "mlmm"}
    for f in run["frameworks"].values():
        assert f["samples_per_s"] > 0 and f["gflop_per_sample"] > 0 and len(f["step_s_all"]) == 2
    assert run["ratio_mlmm_over_open_clip"] == run["frameworks"]["mlmm"]["samples_per_s"] / \
        run["frameworks"]["open_clip"]["samples_per_s"]
    assert result["best_ratio"] > 0 and "best_ratio_vs_open_clip_foreach" in result
