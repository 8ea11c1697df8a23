"""Writing shards never destroys what was there; index.json never disagrees with the tars; bad manifests are refused
with one line naming the file and line (issue 18 part 1)."""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mlmm.atomic import replace_folder
from mlmm.data.shards import iter_samples, resolve_shards
from mlmm.data.write_shards import write_shards

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256 of its bytes), and the folder's siblings (temp folders
    left over)."""
    files = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(folder.rglob("*")) if p.is_file()}
    return {**files, "<siblings>": repr(sorted(p.name for p in folder.parent.iterdir()))}


def rows(n: int, tag: str, image: str = "") -> list[dict]:
    out = [{"key": f"{tag}-{i:03d}", "captions": {"en": [f"{tag} caption {i}"], "de": f"{tag} Satz {i}"}}
           for i in range(n)]
    if image:
        out[0]["image"] = image
    return out


def write_manifest(path: Path, lines: list) -> Path:
    """``lines``: row dicts (dumped as JSON) or raw bytes (written as they are)."""
    path.write_bytes(b"".join(x if isinstance(x, bytes) else json.dumps(x, ensure_ascii=False).encode() + b"\n"
                              for x in lines))
    return path


@pytest.fixture
def previous(tmp_path):
    """A shard folder written by an earlier run (with an image), and its snapshot."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="JPEG")
    (tmp_path / "red.jpg").write_bytes(buf.getvalue())
    manifest = write_manifest(tmp_path / "old.jsonl", rows(7, "old", image="red.jpg"))
    out = tmp_path / "data" / "shards"
    write_shards(manifest, out, shard_size=3, progress=False)
    return out, snapshot(out)


BAD_LINES = [  # (line 2 of the manifest, what the one-line error must say)
    (b'{"key": "b", "captions": {"en": "caf\xe9"}}\n', "not UTF-8"),
    (b'{"key": "b", "captions": {"en": "x"}\n', "invalid JSON"),
    (b'["key", "b"]\n', "must be a JSON object"),
    (json.dumps({"key": "b", "image": 5}).encode() + b"\n", "'image' must be a file path"),
    (json.dumps({"key": "b", "captions": "a cat"}).encode() + b"\n", "'captions' must be a mapping"),
    (json.dumps({"key": "b", "captions": {"en": [1, 2]}}).encode() + b"\n", "must be a string or a list of strings"),
    (json.dumps({"key": "b", "extra_images": ["x.jpg"]}).encode() + b"\n", "'extra_images' must map"),
    (json.dumps({"key": "b", "captions": {"en": ["  ", ""]}}).encode() + b"\n", "holds only blank strings"),
    (json.dumps({"key": "b", "captions": {"en": "   "}}).encode() + b"\n", "holds only blank strings"),
    (json.dumps({"key": "b", "captions": {"English!": "a cat"}}).encode() + b"\n", "is not a language code"),
    (json.dumps({"key": "b.c", "captions": {"en": "x"}}).encode() + b"\n", "'key' must be"),
    (json.dumps({"key": "a", "captions": {"en": "x"}}).encode() + b"\n", "duplicate key 'a' (first on line 1)"),
]


@pytest.mark.parametrize("line,needle", BAD_LINES, ids=[n for _, n in BAD_LINES])
def test_bad_manifest_line_is_refused_naming_file_and_line_before_touching_output(tmp_path, previous, line, needle):
    out, before = previous
    good = json.dumps({"key": "a", "captions": {"en": "a dog"}}).encode() + b"\n"
    manifest = write_manifest(tmp_path / "bad.jsonl", [good, line, good.replace(b'"a"', b'"z"')])
    with pytest.raises(ValueError) as e:
        write_shards(manifest, out, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{manifest}:2: ") and needle in msg and "\n" not in msg, msg
    assert snapshot(out) == before


def test_cli_exits_2_with_one_line_and_keeps_the_previous_shards(tmp_path, previous):
    out, before = previous
    manifest = write_manifest(tmp_path / "bad.jsonl", rows(2, "new") + [b'{"key": "x", "captions": {"xx!": "y"}}\n'])
    res = subprocess.run([sys.executable, "-m", "mlmm.data.write_shards", "--manifest", str(manifest), "--out",
                          str(out)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{manifest}:3:" in lines[0] and "'xx!'" in lines[0], res.stderr
    assert snapshot(out) == before


def test_skips_are_listed_and_summarised(tmp_path, caplog):
    manifest = write_manifest(tmp_path / "m.jsonl", rows(3, "ok") + [
        {"key": "nothing", "captions": {"en": []}}, {"key": "gone", "image": "missing.jpg"}])
    with caplog.at_level("WARNING", logger="mlmm.data.write_shards"):
        index = write_shards(manifest, tmp_path / "out", progress=False)
    assert {s["key"] for s in index["skipped"]} == {"nothing", "gone"}
    summary = [m for m in caplog.messages if m.startswith("3 samples in 1 shards")]
    assert len(summary) == 1 and "skipped 2 of 5" in summary[0] and "missing image file: 1" in summary[0]
    assert "no media file and no caption: 1" in summary[0]


@pytest.mark.parametrize("fault", ["shard_row:6", "folder_before_swap", "folder_after_swap"])
def test_sigkill_at_any_moment_leaves_the_old_or_the_complete_new_shards(tmp_path, previous, fault):
    out, before = previous
    manifest = write_manifest(tmp_path / "new.jsonl", rows(9, "new"))
    env = {**os.environ, "MLMM_INJECT_FAULT": fault}
    res = subprocess.run([sys.executable, "-m", "mlmm.data.write_shards", "--manifest", str(manifest), "--out",
                          str(out), "--shard-size", "4"], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=120)
    assert res.returncode == -9, res.stderr[-2000:]  # SIGKILL, as the fault asked
    if fault != "folder_after_swap":
        after = snapshot(out)
        assert {k: v for k, v in after.items() if k != "<siblings>"} == {
            k: v for k, v in before.items() if k != "<siblings>"}  # byte-identical
    else:  # the swap happened: the complete new shards, consistent with their index
        assert sorted(s["__key__"] for s in iter_samples(resolve_shards(str(out)))) == [f"new-{i:03d}"
                                                                                       for i in range(9)]
    index = write_shards(manifest, out, shard_size=4, progress=False)  # the next run cleans up after the dead one
    assert index["n_samples"] == 9 and sorted(p.name for p in out.parent.iterdir()) == ["shards"]


def test_failure_at_a_row_leaves_the_previous_shards(tmp_path, previous, monkeypatch):
    from mlmm.data import write_shards as ws

    out, before = previous
    real = ws._read_row

    def read_row(row, *args):
        if row["key"] == "new-004":
            raise RuntimeError("disk on fire")
        return real(row, *args)

    monkeypatch.setattr(ws, "_read_row", read_row)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_shards(write_manifest(tmp_path / "new.jsonl", rows(9, "new")), out, shard_size=2, progress=False)
    assert snapshot(out) == before


def test_output_folder_with_foreign_files_is_refused(tmp_path, previous):
    out, _ = previous
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds \['notes.txt'\], which a rewrite would delete"):
        write_shards(write_manifest(tmp_path / "new.jsonl", rows(2, "new")), out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def test_two_rename_fallback_and_recovery(tmp_path, monkeypatch):
    """Where folders cannot be exchanged atomically: two renames; a kill between them is repaired by the next run."""
    import mlmm.atomic as atomic

    out = tmp_path / "out"
    out.mkdir()
    (out / "index.json").write_text("old")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    with replace_folder(out, owned=("index.json",)) as tmp:
        (tmp / "index.json").write_text("new")
    assert (out / "index.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    os.rename(out, tmp_path / ".out.old-999999999")  # the state a kill between the two renames leaves (dead pid)
    with pytest.raises(RuntimeError):
        with replace_folder(out, owned=("index.json",)):
            raise RuntimeError("stop")
    assert (out / "index.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------------- index.json vs the tars
def _rewrite(path: Path, keep) -> None:
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            if keep(name):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_index_that_disagrees_with_the_tars_is_refused_naming_both_counts(tmp_path):
    from mlmm.data.stream import SlotPlan

    manifest = write_manifest(tmp_path / "m.jsonl", rows(10, "s"))
    out = tmp_path / "shards"

    def fresh():
        write_shards(manifest, out, shard_size=4, progress=False)
        return json.loads((out / "index.json").read_text())

    fresh()
    (out / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists 3 shards, the folder holds 2 .tar files \(missing: "
                                                r"\['shard-000001.tar'\]"):
        resolve_shards(str(out))
    fresh()
    (out / "shard-000009.tar").write_bytes((out / "shard-000000.tar").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"lists 3 shards, the folder holds 4 .tar files .*not listed: "
                                                r"\['shard-000009.tar'\]"):
        resolve_shards(str(out))
    fresh()  # a sound tar with one sample fewer than its entry: the rest is counted as lost, indices stay aligned
    _rewrite(out / "shard-000000.tar", lambda name: not name.startswith("s-000."))
    raws = list(SlotPlan([str(out / "shard-000000.tar")], seed=0, slot=0, n_slots=1).epoch_samples(0, 0))
    assert len(raws) == 4 and "the tar ended after 3 of its 4 samples" in raws[-1]["__error__"]
    (out / "shard-000002.tar").write_bytes((out / "shard-000001.tar").read_bytes())  # 4 samples where 2 are listed
    with pytest.raises(RuntimeError, match="holds more than the 2 samples its sample count says"):
        list(SlotPlan([str(out / "shard-000002.tar")], seed=0, slot=0, n_slots=1).epoch_samples(0, 0))
    index = fresh()
    index["n_samples"] = 11
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="n_samples is 11, its shards count 10"):
        resolve_shards(str(out))


# ------------------------------------------------------------------------- the other writers: same guarantees
def test_from_hf_keeps_the_previous_shards_on_a_failure_or_a_kill(tmp_path, monkeypatch):
    import datasets

    from mlmm.data import from_hf

    n = 8
    rows = [f"row {i}" for i in range(n - 1)] + ["   "]
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "shards"
    index = from_hf.convert(str(tmp_path / "hf"), out, split="train", caption_columns=["text:en"], shard_size=3,
                            progress=False)
    assert index["n_samples"] == n - 1 and index["skipped"][0]["reason"].startswith("blank captions")
    before = snapshot(out)
    real = from_hf.row_to_sample

    def row_to_sample(row, key, **kw):
        if key.endswith("4"):
            raise RuntimeError("network gone")
        return real(row, key, **kw)

    monkeypatch.setattr(from_hf, "row_to_sample", row_to_sample)
    with pytest.raises(RuntimeError, match="network gone"):
        from_hf.convert(str(tmp_path / "hf"), out, split="train", caption_columns=["text:de"], progress=False)
    assert snapshot(out) == before
    with pytest.raises(ValueError, match=r"\['text:English'\] do not end in a language code"):
        from_hf.convert(str(tmp_path / "hf"), out, split="train", caption_columns=["text:English"], progress=False)
    env = {**os.environ, "MLMM_INJECT_FAULT": "shard_row:2", "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "mlmm.data.from_hf", "--dataset", str(tmp_path / "hf"), "--out",
                          str(out), "--caption-column", "text:fr"], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=300)
    assert res.returncode == -9, res.stderr[-2000:]
    assert {k: v for k, v in snapshot(out).items() if k != "<siblings>"} == {
        k: v for k, v in before.items() if k != "<siblings>"}


@pytest.fixture
def tiny_teacher(tmp_path):
    import yaml

    from mlmm.distill.tiny import write_tiny_open_clip

    cfg = write_tiny_open_clip(tmp_path / "teacher")
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump({"teacher": cfg}))
    return tmp_path / "teacher.yaml"


def test_parallel_and_precompute_keep_the_previous_output(tmp_path, tiny_teacher, monkeypatch):
    from mlmm.distill import parallel, precompute

    jsonl = write_manifest(tmp_path / "par.jsonl", [{"captions": {"en": f"a cat {i}", "de": f"eine Katze {i}"}}
                                                    for i in range(5)])
    out = tmp_path / "runs" / "m30k"
    index = parallel.build(jsonl, out, teacher_yaml=str(tiny_teacher), shard_size=2)
    assert index["n_samples"] == 5 and index["teacher"]["dim"] == 32
    assert json.loads((out / "raw" / "index.json").read_text())["manifest"] == str(out / "manifest.jsonl")
    keys = [s["__key__"] for s in iter_samples(resolve_shards(str(out / "shards")))]
    assert len(keys) == 5 and all("teacher_text.npy" in s for s in iter_samples(resolve_shards(str(out / "shards"))))
    assert_no_pax_headers(out / "shards")  # written by precompute
    before = snapshot(out)
    bad = write_manifest(tmp_path / "bad.jsonl", [{"captions": {"en": "x"}}, b'{"captions": {"en": ["", " "]}}\n'])
    with pytest.raises(ValueError, match=f"^{bad}:2: captions\\['en'\\] holds only blank strings$"):
        parallel.build(bad, out, teacher_yaml=str(tiny_teacher))
    assert snapshot(out) == before

    calls = []
    real = precompute.embed_samples

    def embed(teacher, samples, frames):
        calls.append(len(samples))
        if len(calls) == 2:
            raise RuntimeError("teacher died")
        return real(teacher, samples, frames)

    monkeypatch.setattr(precompute, "embed_samples", embed)
    with pytest.raises(RuntimeError, match="teacher died"):  # after OUT/manifest.jsonl and OUT/raw were rebuilt
        parallel.build(jsonl, out, teacher_yaml=str(tiny_teacher), shard_size=2)
    assert snapshot(out) == before
    calls.clear()
    cfg, _ = precompute.teacher_from_yaml(tiny_teacher)
    shards_before = snapshot(out / "shards")
    with pytest.raises(RuntimeError, match="teacher died"):
        precompute.precompute(cfg, str(out / "raw"), out / "shards", chunk=1, progress=False)
    assert snapshot(out / "shards") == shards_before
    with pytest.raises(ValueError, match="must differ from the input shard folder"):
        precompute.precompute(cfg, str(out / "raw"), out / "raw", progress=False)
    assert snapshot(out) == before



def assert_no_pax_headers(folder: Path) -> None:
    """Members get a whole-second mtime: webdataset's float default costs a pax header (1 KB) per member."""
    tars = sorted(folder.glob("*.tar"))
    assert tars
    for tar in tars:
        with tarfile.open(tar) as t:
            members = t.getmembers()
            assert members and all(not m.pax_headers and m.mtime == int(m.mtime) for m in members), tar.name


def test_shard_members_carry_no_pax_headers(previous):
    assert_no_pax_headers(previous[0])
