"""The throughput benchmark runs end to end on the tiny shape (the figures themselves live in benchmarks/results)."""
import json
import math

from conftest import import_benchmark


def test_throughput_benchmark_times_both_frameworks_and_writes_its_ratio(tmp_path):
    throughput = import_benchmark("throughput")
    out = tmp_path / "tp.json"
    assert throughput.main(["--shape", "tiny", "--batch", "4", "--precision", "fp32", "--warmup", "1", "--steps", "1",
                            "--reps", "2", "--max-load", "1000", "--open-clip-foreach", "--trainer-workers", "0",
                            "--trainer-log-every", "2",
                            "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0  # in-process: no re-exec
    result = json.loads(out.read_text())
    run = result["runs"][0]
    assert set(run["frameworks"]) == {"open_clip", "open_clip_foreach", "mlmm"}
    for f in run["frameworks"].values():
        assert f["samples_per_s"] > 0 and f["gflop_per_sample"] > 0 and len(f["step_s_all"]) == 2
    assert run["ratio_mlmm_over_open_clip"] == run["frameworks"]["mlmm"]["samples_per_s"] / \
        run["frameworks"]["open_clip"]["samples_per_s"]
    assert result["best_ratio"] > 0 and "best_ratio_vs_open_clip_foreach" in result
    assert len(run["load_1m_all"]) == 3 and len(run["trainer"]["load_1m_all"]) == 2  # before each rep + the peak
    # mlmm's real step (Trainer.run_step: loader, checks, guards, logging) beside its engine calls, same trainer
    trainer = run["trainer"]
    for name in ("train_step", "engine_only"):
        assert trainer[name]["samples_per_s"] > 0 and len(trainer[name]["step_s_all"]) == 2
    assert trainer["overhead"] == trainer["train_step"]["step_s"] / trainer["engine_only"]["step_s"] - 1
    assert (tmp_path / "work" / "run" / "train.log").is_file()  # a real Trainer ran (and logged)


def test_eval_throughput_benchmark_runs_both_loops_with_equal_metrics(tmp_path):
    """A 2-layer 32-px open_clip ViT on 30 images: both loops run, the metrics agree, the ratio is written."""
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "mlmm-tiny-vit.json").write_text(json.dumps({
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}))
    bench = import_benchmark("eval_throughput")
    out = tmp_path / "et.json"
    assert bench.main(["--n", "30", "--size", "48", "--arch", "mlmm-tiny-vit", "--config", str(cfg), "--batch", "8",
                       "--workers", "0", "--reps", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["max_metric_gap"] <= 1e-5 and result["ratio_mlmm_over_clip_benchmark"] > 0
    assert {r["run"] for r in result["rows"]} == {"clip_benchmark/w0", "mlmm/w0"}


def test_eval_throughput_retrieval_mode_runs_both_loops_per_language_with_equal_metrics(tmp_path):
    """Retrieval mode on 10 images x 5 captions (en + de, one caption repeated: passed over): CLIP_benchmark's loop
    once per language and mlmm's evaluator once, the recalls agree, the ratio and caption statistics are written."""
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "mlmm-tiny-vit.json").write_text(json.dumps({
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    words = "a man in an orange hat is staring at something near the white fence on green grass".split()
    rows = [{"captions": {"en": " ".join(words[:3 + i % 14]) + f" {i}", "de": f"ein Hund {i} " * (1 + i % 5)}}
            for i in range(52)]
    rows.insert(7, rows[3])  # a repeated caption: passed over, so every query has one positive on both sides
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    bench = import_benchmark("eval_throughput")
    out = tmp_path / "er.json"
    assert bench.main(["--mode", "retrieval", "--n", "10", "--size", "48", "--arch", "mlmm-tiny-vit", "--config",
                       str(cfg), "--batch", "4", "--workers", "0", "--reps", "1", "--languages", "en", "de",
                       "--captions", str(tmp_path / "caps.jsonl"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["max_metric_gap"] <= 1e-5 and result["ratio_mlmm_over_clip_benchmark"] > 0
    assert result["texts"] == 100 and 3 < result["mean_tokens_per_text"] < 77 and result["context_length"] == 77
    for row in result["rows"]:
        assert {k.split("/")[0] for k in row["metrics"]} == {"en", "de"} and len(row["metrics"]) == 12
    assert {e["label"] for e in result["load_log"]} >= {"clip_benchmark/w0", "mlmm/w0"}


def test_video_loader_benchmark_times_every_loader_on_original_and_transcoded_shards(tmp_path):
    """One real clip x 3, T = 2 frames of 32 px: the plain PyAV, mlmm (and decord if installed) loaders run on the
    clips as they are and transcoded at write time; rates, ratios, loads and the one-time cost are written."""
    bench = import_benchmark("video_loader")
    out = tmp_path / "vl.json"
    assert bench.main(["--clips", "1", "--repeat", "3", "--reps", "1", "--frames", "2", "--frame-size", "32",
                       "--fps", "2", "--size", "64", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    loaders = {r["loader"]: r for r in result["rows"]}
    expected = {"plain", "mlmm"} | ({"decord"} if result["decord"] else set())
    assert set(loaders) == {f"{a}/{b}" for a in expected for b in ("original", "transcoded")}
    for r in loaders.values():
        assert r["samples_per_s"] > 0 and len(r["all"]) == 1 and len(r["load_1m_all"]) == 1
    assert loaders["plain/original"]["ratio_vs_plain_original"] == 1.0
    assert result["ratio_mlmm_transcoded"] == loaders["mlmm/transcoded"]["samples_per_s"] / \
        loaders["plain/original"]["samples_per_s"]
    assert result["samples"] == 3 and result["transcode"]["write_seconds"] > 0
    assert result["transcode"]["kb_per_sample"] < result["original"]["kb_per_sample"]  # 2 fps, 64 px: smaller


def test_wait_quiet_waits_for_the_others_load_not_the_benchmarks_own(monkeypatch):
    """Timings start only when the 1-minute load minus the benchmark's own share is below --max-load; each wait is
    logged with the load seen."""
    from benchmarks import bench_common as bc

    loads = iter([3.0, 2.6, 2.2])  # others 1.0 -> 0.6 -> 0.2 with the benchmark's own share at 2.0
    monkeypatch.setattr(bc, "load_1m", lambda: next(loads))
    monkeypatch.setattr(bc, "own_load", lambda: 2.0)
    monkeypatch.setattr(bc.time, "sleep", lambda s: None)
    monkeypatch.setattr(bc, "LOAD_LOG", [])
    assert bc.wait_quiet(0.5, label="rep 1") == 2.2
    assert bc.LOAD_LOG[-1]["others"] == 0.2 and bc.LOAD_LOG[-1]["own_estimate"] == 2.0
    monkeypatch.setattr(bc, "load_1m", lambda: 9.0)
    assert bc.wait_quiet(None) == 9.0  # no limit: no wait


def test_own_load_follows_the_kernels_one_minute_average(monkeypatch):
    """Busy for 60 s on 2 threads -> own share 2 * (1 - 1/e); then idle for 60 s -> that times 1/e."""
    from benchmarks import bench_common as bc

    clock = {"t": 0.0, "cpu": 0.0}
    monkeypatch.setattr(bc.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(bc, "_cpu_seconds", lambda: clock["cpu"])
    monkeypatch.setattr(bc, "_OWN", {"t": 0.0, "cpu": 0.0, "load": 0.0})
    clock.update(t=60.0, cpu=120.0)
    busy = bc.own_load()
    assert abs(busy - 2 * (1 - math.exp(-1))) < 1e-9
    clock.update(t=120.0)
    assert abs(bc.own_load() - busy * math.exp(-1)) < 1e-9


def test_audio_loader_benchmark_times_the_three_loaders_with_equal_features(tmp_path):
    """FSDD x 1, batches of 8: the plain soundfile + torchaudio loader, mlmm's and mlmm with data.logmel_on_device
    give the same features and are timed in both layouts; rates, CPU time per sample, ratios and loads are written."""
    bench = import_benchmark("audio_loader")
    out = tmp_path / "al.json"
    assert bench.main(["--repeat", "1", "--per-shard", "100", "--batch-size", "8", "--batches", "2", "--warmup", "1",
                       "--reps", "1", "--same-process", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["loader"]: r for r in result["rows"]}
    assert set(rows) == {f"{a}/{b}" for a in ("plain", "mlmm", "mlmm_device") for b in ("inproc", "worker")}
    assert result["samples"] == 300 and result["max_abs_diff_vs_plain"] < 1e-5
    for r in rows.values():
        assert r["samples_per_s"] > 0 and r["cpu_ms_per_sample"] > 0 and len(r["all"]) == 1
        assert r["all"][0]["samples"] == 16 and "load_1m" in r["all"][0]
    assert rows["plain/inproc"]["ratio_cpu_vs_plain"] == 1.0
    assert rows["mlmm_device/inproc"]["features_ms_per_sample"] > rows["mlmm/inproc"]["features_ms_per_sample"]
    assert "worker_samples_per_s" not in rows["mlmm/worker"]
