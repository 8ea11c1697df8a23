"""Shards anywhere (issue 20 parts 1-3): http(s) / pipe: / s3 / gs specs resolve and read through webdataset's gopen;
training, evaluation and precompute over a local HTTP server and `pipe:cat` equal the local files; a run SIGKILLed
mid-epoch resumes exactly over http and over pipe:, skipping whole shards unopened; a stream cut mid-shard is retried
without losing or duplicating a sample; a shard that stays unreadable is counted as bad samples. The shard writers'
`--out` takes the same forms: uploaded by PUT, through `pipe:CMD {name}`, aws / gsutil, index.json last."""
import itertools
import json
import logging
import os
import shutil

import pytest
import torch
from conftest import build_tiny_data
from shard_server import ShardServer
from test_reliability import TINY, overrides, run_in_process, run_killed

from mlmm.config import load_config
from mlmm.data.preprocess import load_eval_items, Preprocessor
from mlmm.data.shards import iter_samples, resolve_shards
from mlmm.data.shard_output import UploadError
from mlmm.data.shardio import ShardReader, redact, shard_name
from mlmm.data.stream import ShuffleBuffer, SlotPlan
from mlmm.data.tokenization import load_tokenizer
from mlmm.data.train_stream import TrainStream
from mlmm.data.write_shards import main as write_shards_main, write_shards


@pytest.fixture(scope="module")
def remote_data(tmp_path_factory):
    """The reliability tests' data, plus `web/`: the same shards with open_clip's sizes.json and no index.json."""
    root = build_tiny_data(tmp_path_factory.mktemp("remote"), n_images=60, n_videos=12, n_audio=40, shard_size=16,
                           seed=2)
    index = json.loads((root / "shards" / "index.json").read_text())
    (root / "web").mkdir()
    for s in index["shards"]:
        shutil.copy(root / "shards" / s["name"], root / "web" / s["name"])
    (root / "web" / "sizes.json").write_text(json.dumps({s["name"]: s["n"] for s in index["shards"]}))
    return root


def brace(root, last=None) -> str:
    n = len(json.loads((root / "shards" / "index.json").read_text())["shards"]) if last is None else last + 1
    return f"shard-{{000000..{n - 1:06d}}}.tar"


@pytest.fixture()
def server(remote_data):
    with ShardServer(remote_data / "web") as srv:
        yield srv


def samples_of(spec: str) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in iter_samples(resolve_shards(spec))]


# ------------------------------------------------------------------------------------------ specs
def test_specs_resolve_without_network_and_refuse_what_webdataset_cannot_open(remote_data):
    names = [shard_name(p) for p in resolve_shards(str(remote_data / "shards"))]
    assert resolve_shards(f"http://h:1/d/{brace(remote_data)}") == [f"http://h:1/d/{n}" for n in names]
    assert resolve_shards("pipe:aws s3 cp s3://b/x-{0..1}.tar -,s3://b/y.tar,gs://b/z.tar") == [
        "pipe:aws s3 cp s3://b/x-0.tar -", "pipe:aws s3 cp s3://b/x-1.tar -", "s3://b/y.tar", "gs://b/z.tar"]
    assert resolve_shards(f"file://{remote_data / 'shards' / names[0]}") == [str(remote_data / "shards" / names[0])]
    assert [shard_name(u) for u in ("https://h/a/b.tar?sig=1", "pipe:curl -s 'https://h/a/c.tar' | cat",
                                    "pipe:aws s3 cp s3://b/d.tar -", "pipe:echo")] == ["b.tar", "c.tar", "d.tar", None]
    with pytest.raises(ValueError, match="password.*environment"):
        resolve_shards("https://user:hunter2@h/x.tar")
    with pytest.raises(ValueError, match="globs work on local paths only"):
        resolve_shards("https://h/d/*.tar")
    with pytest.raises(ValueError, match="unknown scheme 'nope'"):
        resolve_shards("nope://h/x.tar")
    secret = "pipe:AWS_SECRET_ACCESS_KEY=abc aws s3 cp 's3://b/x.tar?X-Amz-Signature=def' - # https://u:pw@h/y"
    assert "abc" not in redact(secret) and "def" not in redact(secret) and "pw" not in redact(secret)
    assert redact("https://h/x.tar") == "https://h/x.tar"


def test_training_evaluation_and_counts_read_the_same_samples_over_http_and_pipe(remote_data, server):
    local = resolve_shards(str(remote_data / "shards"))
    http = resolve_shards(f"{server.url}/{brace(remote_data)}")
    pipe = resolve_shards(f"pipe:cat {remote_data / 'web'}/{brace(remote_data)}")
    want = [(s["__key__"], s["json"]) for s in iter_samples(local)]
    for shards in (http, pipe):
        assert [(s["__key__"], s["json"]) for s in iter_samples(shards)] == want
    # counts: index.json beside local shards, sizes.json beside URLs, data.shard_sizes for pipe: (nothing beside)
    counts = ShardReader().counts(local)
    assert all(counts) and ShardReader().counts(http) == counts
    assert ShardReader().counts(pipe) == [None] * len(pipe)
    assert ShardReader(sizes=f"{server.url}/sizes.json").counts(pipe) == counts
    # evaluation reads through the same opener
    cfg = load_config(TINY, overrides(remote_data, remote_data / "unused"))
    cfg.model.video = cfg.model.audio = None
    pre = Preprocessor(cfg.model, load_tokenizer(remote_data / "tok"), train=False)
    ref = load_eval_items(str(remote_data / "shards"), pre, ["image"])
    got = load_eval_items(f"{server.url}/{brace(remote_data)}", pre, ["image"])
    assert got["keys"] == ref["keys"] and got["captions"] == ref["captions"]
    assert torch.equal(got["image"]["data"], ref["image"]["data"])
    # the streamed eval reader (run_retrieval / run_zeroshot / run_suite) too
    from mlmm.evaluation.models import MlmmEvalModel
    from mlmm.evaluation.stream import captions_of, embed_test_set
    from mlmm.models.model import MultimodalModel

    model = MlmmEvalModel(MultimodalModel(cfg.model, pre.tokenizer))
    streamed = [embed_test_set(model, spec, ["image"], keep=captions_of(), progress=False)
                for spec in (str(remote_data / "shards"), f"{server.url}/{brace(remote_data)}")]
    assert streamed[0].keys == streamed[1].keys == ref["keys"] and streamed[0].meta == streamed[1].meta
    assert torch.equal(streamed[0].emb["image"], streamed[1].emb["image"])


def fake_bucket_tools(bin_dir, bucket_dir):
    """`aws s3 cp SRC DST` and `gsutil cat URL` / `gsutil cp - URL` stand-ins over a local folder (bucket "b")."""
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "aws").write_text(f"""#!/bin/sh
[ "$1 $2" = "s3 cp" ] || exit 2
if [ "$4" = "-" ]; then exec cat "{bucket_dir}/${{3#s3://b/}}"; else exec cat > "{bucket_dir}/${{4#s3://b/}}"; fi
""")
    (bin_dir / "gsutil").write_text(f"""#!/bin/sh
if [ "$1" = "cat" ]; then exec cat "{bucket_dir}/${{2#gs://b/}}"; fi
[ "$1 $2" = "cp -" ] && exec cat > "{bucket_dir}/${{3#gs://b/}}"
exit 2
""")
    for tool in ("aws", "gsutil"):
        (bin_dir / tool).chmod(0o755)


def test_s3_and_gs_urls_read_through_the_cli_tools(remote_data, tmp_path, monkeypatch):
    """s3:// goes through `aws s3 cp URL -`, gs:// through webdataset's `gsutil cat`; sizes.json beside them too."""
    fake_bucket_tools(tmp_path / "bin", remote_data / "web")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    want = [s["__key__"] for s in iter_samples(resolve_shards(str(remote_data / "shards")))]
    counts = ShardReader().counts(resolve_shards(str(remote_data / "shards")))
    for scheme in ("s3", "gs"):
        shards = resolve_shards(f"{scheme}://b/{brace(remote_data)}")
        assert [s["__key__"] for s in iter_samples(shards)] == want
        assert ShardReader().counts(shards) == counts


def test_precompute_reads_http_and_pipe_inputs(remote_data, server, tmp_path):
    from mlmm.typed import from_dict
    from mlmm.distill.precompute import precompute
    from mlmm.distill.teacher import TeacherConfig, build_teacher
    from mlmm.distill.tiny import write_tiny_open_clip

    cfg = from_dict(TeacherConfig, write_tiny_open_clip(tmp_path / "teacher"))
    teacher = build_teacher(cfg)
    two = brace(remote_data, last=1)
    outs = {}
    for name, spec in (("local", f"{remote_data / 'shards'}/{two}"), ("http", f"{server.url}/{two}"),
                       ("pipe", f"pipe:cat {remote_data / 'web'}/{two}")):
        index = precompute(cfg, spec, tmp_path / name, progress=False, teacher=teacher)
        outs[name] = ([(s["__key__"], s["json"], s.get("teacher_text.npy"), s.get("teacher_image.npy"))
                       for s in iter_samples(resolve_shards(str(tmp_path / name)))], index["shards"])
    assert outs["local"][0] and any(s[3] is not None for s in outs["local"][0])
    assert outs["http"] == outs["local"] and outs["pipe"] == outs["local"]
    (tmp_path / "piped").mkdir()  # --out a pipe: as write_shards' (tests below)
    index = precompute(cfg, f"{remote_data / 'shards'}/{two}", f"pipe:cat > {tmp_path / 'piped'}/{{name}}",
                       progress=False, teacher=teacher)
    assert index["shards"] == outs["local"][1] and sorted(os.listdir(tmp_path / "piped")) == sorted(
        [*(s["name"] for s in index["shards"]), "index.json"])
    assert [(s["__key__"], s["json"], s.get("teacher_text.npy"), s.get("teacher_image.npy"))
            for s in iter_samples(resolve_shards(str(tmp_path / "piped")))] == outs["local"][0]


# ------------------------------------------------------------------------------------------ retries
def stream_cfg(root, *extra):
    cfg = load_config(TINY, overrides(root, root / "unused", "data.shuffle_buffer=0", "data.batch_size=8",
                                      "data.io_backoff=0.01", *extra))
    cfg.model.video = cfg.model.audio = None  # keys are what matters: decode images + text only
    return cfg


def one_epoch(cfg, shards, pre):
    """The batches of one epoch (112 samples, no shuffle buffer: 14 batches of 8) and the skip counts after it."""
    batches = list(itertools.islice(iter(TrainStream(shards, cfg.data, pre, rank=0, world_size=1)), 14))
    return [k for b in batches for k in b.keys], batches[-1].data_state


def test_stream_cut_mid_shard_is_retried_and_nothing_is_lost_or_duplicated(remote_data, server, caplog):
    cfg = stream_cfg(remote_data)
    pre = Preprocessor(cfg.model, load_tokenizer(remote_data / "tok"), train=True)
    want, _ = one_epoch(cfg, resolve_shards(str(remote_data / "shards")), pre)
    shards = resolve_shards(f"{server.url}/{brace(remote_data)}?token=SECRET")
    server.flaky.update({shard_name(s): 1 for s in shards})  # every shard: cut halfway on its first request
    with caplog.at_level(logging.WARNING, logger="mlmm.data"):
        got, state = one_epoch(cfg, shards, pre)
    assert got == want and len(set(got)) == len(got) == 112  # one epoch exactly, in the same order
    assert not state["skipped"]
    assert all(server.requests.count(shard_name(s)) == 2 for s in shards)
    assert "(transfer cut short); retry 1 of 3" in caplog.text
    assert "?***" in caplog.text and "SECRET" not in caplog.text


def test_shard_unreadable_after_the_retries_counts_its_samples_as_bad(remote_data, server, caplog):
    cfg = stream_cfg(remote_data, "data.io_retries=2")
    pre = Preprocessor(cfg.model, load_tokenizer(remote_data / "tok"), train=True)
    shards = resolve_shards(f"{server.url}/{brace(remote_data)}")
    dead = shard_name(SlotPlan(shards, seed=0, slot=0, n_slots=1).epoch_order(0)[0])  # read first in epoch 0
    server.flaky[dead] = 100  # never served whole
    n_dead = json.loads((remote_data / "web" / "sizes.json").read_text())[dead]
    dead_keys = {raw["__key__"] for raw in iter_samples([str(remote_data / "web" / dead)])}
    plan = SlotPlan(shards, seed=0, slot=0, n_slots=1, reader=ShardReader(retries=2, backoff=0.01))
    with caplog.at_level(logging.WARNING, logger="mlmm.data"):
        epoch = list(plan.epoch_samples(0, 0))
    bad = [raw for raw in epoch if "__error__" in raw]
    keys = [raw["__key__"] for raw in epoch if "__error__" not in raw]
    delivered = len(dead_keys & set(keys))  # read before the first cut: given out once, never again
    assert delivered <= n_dead // 2 and server.requests.count(dead) == 3
    # the rest of the shard becomes one bad sample per sample it held: raw indices stay aligned (one epoch = 112)
    assert len(epoch) == 112 and len(bad) == n_dead - delivered and len(set(keys)) == len(keys) == 112 - len(bad)
    assert all(raw["__error__"].startswith(f"unreadable shard: {dead}: curl exited with status 18") for raw in bad)
    # ... which the training stream counts (under data.max_bad_fraction) and logs once, naming the URL
    stream = iter(TrainStream(shards, cfg.data, pre, rank=0, world_size=1))
    with caplog.at_level(logging.WARNING, logger="mlmm.data"):
        state = next(itertools.islice(stream, 13, None)).data_state  # 14 batches: past the dead shard
    assert state["skipped"]["unreadable shard"] >= n_dead - n_dead // 2  # the server never sends the second half
    assert f"unreadable shard) in {server.url}/{dead}" in caplog.text


def test_resume_without_counts_reads_and_drops_with_a_warning(remote_data, caplog):
    cfg = stream_cfg(remote_data, "data.shuffle_buffer=10")
    pre = Preprocessor(cfg.model, load_tokenizer(remote_data / "tok"), train=True)
    shards = resolve_shards(f"pipe:cat {remote_data / 'web'}/{brace(remote_data)}")  # no sizes: nothing beside pipe:
    full = list(itertools.islice(iter(TrainStream(shards, cfg.data, pre, rank=0, world_size=1)), 8))
    st = full[4].data_state
    state = {"slots": {"0": {x: st[x] for x in ("emitted", "used", "skipped")}}}
    with caplog.at_level(logging.WARNING, logger="mlmm.data"):
        resumed = list(itertools.islice(iter(TrainStream(shards, cfg.data, pre, rank=0, world_size=1, state=state)), 3))
    assert [b.keys for b in resumed] == [b.keys for b in full[5:8]]
    assert "no sample counts" in caplog.text and "reading and dropping" in caplog.text


# ------------------------------------------------------------------------------------------ exact resume
# checkpoint at step 6: the shuffle buffer (20) then holds raw samples from 28 on, so shard 1 of epoch 0 is skipped;
# 10 steps of 8 + the buffer stay inside epoch 0 (112 samples), so a skipped shard is never asked for again
COMMON = ["train.max_steps=10", "train.save_every=3", "train.log_every=100"]


@pytest.fixture(scope="module")
def local_reference(remote_data, tmp_path_factory):
    """The uninterrupted run over the local shard folder."""
    return run_in_process(remote_data, tmp_path_factory.mktemp("ref") / "run", *COMMON)


def unopened_shards(root, ckpt) -> set[str]:
    """Shards of epoch 0 wholly before the oldest raw sample the resumed slot must re-read (restore's `start`)."""
    pos = json.loads((ckpt / "mlmm_state.json").read_text())["data"]["ranks"][0]["slots"]["0"]
    emitted = int(pos["emitted"]) - (1 if int(pos["used"]) else 0)
    buffer, r = ShuffleBuffer(20, "shuffle/0/0"), 0  # overrides(): data.shuffle_buffer=20, data.seed 0
    while emitted:
        emitted -= buffer.push(r) is not None
        r += 1
    start = min(buffer.items + [r])
    plan = SlotPlan(resolve_shards(str(root / "shards")), seed=0, slot=0, n_slots=1)
    before, pos = set(), 0
    for shard in plan.epoch_order(0):
        pos += plan.counts[shard]
        if pos > start:
            return before
        before.add(shard_name(shard))
    return before


@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_sigkill_then_resume_over_remote_shards_is_exact(remote_data, local_reference, server, tmp_path, kind, caplog):
    """Killed after step 7 (checkpoint at 6) reading http:// (sizes.json beside) or pipe:cat (data.shard_sizes), then
    resumed: losses of steps 7-10 and the final weights equal the uninterrupted local-file run."""
    ref, ref_weights = local_reference
    if kind == "http":
        extra = [f"data.train_shards={server.url}/{brace(remote_data)}"]
    else:
        extra = [f"data.train_shards=pipe:cat {remote_data / 'web'}/{brace(remote_data)}",
                 f"data.shard_sizes={remote_data / 'web' / 'sizes.json'}"]
    run_killed(remote_data, tmp_path / "run", "after_step:7", *COMMON, *extra)
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000006"
    skipped = unopened_shards(remote_data, ckpt / "step_00000006")
    server.requests.clear()
    with caplog.at_level(logging.WARNING, logger="mlmm.data"):
        resumed, weights = run_in_process(remote_data, tmp_path / "run", *COMMON, *extra)
    assert resumed.losses == pytest.approx(ref.losses[6:], abs=1e-6)
    for k, v in ref_weights.items():
        torch.testing.assert_close(weights[k], v, rtol=0, atol=1e-6)
    assert "reading and dropping" not in caplog.text  # counts were found: whole shards skipped
    if kind == "http":
        assert skipped and not skipped & set(server.requests), (skipped, server.requests)



def test_remote_reader_benchmark_runs_on_a_tiny_shape(tmp_path):
    from conftest import import_benchmark

    bench = import_benchmark("remote_reader")
    out = tmp_path / "r.json"
    assert bench.main(["--n", "48", "--per-shard", "16", "--size", "64", "--batch", "8", "--reps", "1",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for level in ("raw", "stream", "stream_per_cpu_s"):
        assert set(result["median_samples_per_s"][level]) == {"local", "http", "pipe"}
        assert all(v > 0 for v in result["median_samples_per_s"][level].values())
    assert len(result["load_average_before"]) == 3 and len(result["load_1m_at_each_rep"]) == 1


def test_a_bad_shard_sizes_file_fails_before_training(remote_data, tmp_path):
    from mlmm.data.train_stream import build_train_loader

    cfg = stream_cfg(remote_data, f"data.shard_sizes={tmp_path / 'nope.json'}")
    pre = Preprocessor(cfg.model, load_tokenizer(remote_data / "tok"), train=True)
    with pytest.raises(FileNotFoundError, match="data.shard_sizes: .*nope.json does not exist"):
        build_train_loader(cfg.data, pre, rank=0, world_size=1)
    (tmp_path / "bad.json").write_text("[1, 2]")
    cfg.data.shard_sizes = str(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="data.shard_sizes: cannot read sample counts"):
        build_train_loader(cfg.data, pre, rank=0, world_size=1)


# ------------------------------------------------------------------------------------------ writing
def test_write_shards_to_http_and_pipe_then_training_reads_what_a_local_write_holds(remote_data, tmp_path):
    manifest = remote_data / "gen" / "manifest.jsonl"
    local = write_shards(manifest, tmp_path / "local", shard_size=16, progress=False)
    names = [s["name"] for s in local["shards"]]
    want = samples_of(str(tmp_path / "local"))
    (tmp_path / "bucket").mkdir()
    with ShardServer(tmp_path / "bucket") as srv:
        url = f"{srv.url}/laion/shards"
        assert write_shards(manifest, url, shard_size=16, progress=False) == local
        assert srv.requests == [f"PUT laion/shards/{n}" for n in [*names, "index.json"]]  # each tar, index.json last
        spec = f"{url}/shard-{{000000..{len(names) - 1:06d}}}.tar"
        assert samples_of(spec) == want
        assert ShardReader().counts(resolve_shards(spec)) == [s["n"] for s in local["shards"]]  # the uploaded index
        cfg = stream_cfg(remote_data)
        pre = Preprocessor(cfg.model, load_tokenizer(remote_data / "tok"), train=True)
        assert one_epoch(cfg, resolve_shards(spec), pre)[0] == one_epoch(cfg, resolve_shards(str(tmp_path / "local")),
                                                                         pre)[0]
    (tmp_path / "piped").mkdir()
    assert write_shards(manifest, f"pipe:cat > {tmp_path / 'piped'}/{{name}}", shard_size=16, progress=False) == local
    assert samples_of(str(tmp_path / "piped")) == want  # a folder again: read through the index.json written last
    assert write_shards(manifest, f"file://{tmp_path / 'file'}", shard_size=16, progress=False) == local
    assert samples_of(str(tmp_path / "file")) == want


def test_s3_and_gs_outputs_write_through_the_cli_tools(remote_data, tmp_path, monkeypatch):
    fake_bucket_tools(tmp_path / "bin", tmp_path / "bucket")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    manifest = remote_data / "gen" / "manifest.jsonl"
    local = write_shards(manifest, tmp_path / "local", shard_size=64, progress=False)
    for scheme in ("s3", "gs"):
        (tmp_path / "bucket").mkdir()
        assert write_shards(manifest, f"{scheme}://b", shard_size=64, progress=False) == local
        assert samples_of(str(tmp_path / "bucket")) == samples_of(str(tmp_path / "local"))
        shutil.rmtree(tmp_path / "bucket")


def test_unwritable_output_specs_are_refused_in_one_line_before_any_work(tmp_path, capsys):
    from mlmm.distill.precompute import precompute

    missing = tmp_path / "never-read.jsonl"  # the spec is refused first: no "manifest not found"
    for out, why in (("pipe:aws s3 cp - s3://b/x.tar", r"needs \{name\} where each file goes"),
                     ("hf://datasets/me/x", "cannot write to hf://"), ("nope://h/x", "cannot write to nope://"),
                     ("https://me:hunter2@h/x", "holds a password; give credentials through the environment"),
                     ("s3://", "expected s3://HOST_OR_BUCKET/prefix")):
        with pytest.raises(ValueError, match=f"--out: .*{why}") as e:
            write_shards(missing, out, progress=False)
        assert "hunter2" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"needs \{name\}"):  # before the teacher is built (None would fail)
        precompute(None, str(missing), "pipe:cat > x", progress=False)
    with pytest.raises(SystemExit) as e:  # the command line: one line, exit 2
        write_shards_main(["--manifest", str(missing), "--out", "pipe:cat"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        "error: --out: 'pipe:cat': a pipe: output needs {name} where each file goes, e.g. "
        "'pipe:aws s3 cp - s3://bucket/shards/{name}'\n")


def test_a_failed_upload_names_the_file_and_writes_no_index(remote_data, tmp_path, caplog, capsys):
    manifest = remote_data / "gen" / "manifest.jsonl"
    dest = tmp_path / "dest"
    dest.mkdir()
    # the command fails for the second shard: the first is uploaded, the writer stops, index.json is never written
    out = f"pipe:AWS_SECRET_ACCESS_KEY=hunter2 test {{name}} != shard-000001.tar && cat > {dest}/{{name}}"
    with caplog.at_level(logging.INFO, logger="mlmm.data"), pytest.raises(UploadError) as e:
        write_shards(manifest, out, shard_size=16, progress=False)
    assert str(e.value) == ("--out: writing shard-000001.tar to pipe:AWS_SECRET_ACCESS_KEY=*** test shard-000001.tar "
                            f"!= shard-000001.tar && cat > {dest}/shard-000001.tar failed: pipe command exited with "
                            "status 1 (index.json not written)")
    assert sorted(os.listdir(dest)) == ["shard-000000.tar"]
    assert "hunter2" not in caplog.text and "1 files uploaded before the failure" in caplog.text
    with pytest.raises(UploadError, match=r"writing index.json to .* failed: pipe command exited with status 1 "
                                          r"\(every tar was uploaded; delete any partial index.json"):
        write_shards(manifest, f"pipe:test {{name}} != index.json && cat > {dest}/{{name}}", shard_size=64,
                     progress=False)
    assert sorted(os.listdir(dest)) == ["shard-000000.tar", "shard-000001.tar"]
    with pytest.raises(SystemExit) as e:  # the command line: one line naming the file
        write_shards_main(["--manifest", str(manifest), "--out", f"pipe:cat > {tmp_path / 'missing'}/{{name}}"])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and err[-1] == (f"error: --out: writing shard-000000.tar to pipe:cat > {tmp_path}/missing/"
                                             "shard-000000.tar failed: pipe command exited with status 2 (index.json "
                                             "not written)")
    assert not (tmp_path / "missing").exists()
