"""Dataset builders (issue 21 part 3): each standard benchmark layout, faked in its real file formats (a few rows),
plus the real ../shared/data sets where they fit (Multi30K captions, MSR-VTT clips, FSDD audio), becomes eval
shards with one command; a missing file is a one-line error naming it."""
import gzip
import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def jpg(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = (np.random.default_rng(seed).random((24, 32, 3)) * 255).astype("uint8")
    Image.fromarray(rgb).save(path, quality=80)
    return path


def wav(path: Path, seed: int = 0) -> Path:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.random.default_rng(seed).normal(0, 0.1, 4000).astype("float32"), 8000)
    return path


def lines(path: Path, rows, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{r}\n" for r in rows).encode("utf-8")
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


def shared_rows(rel: str, n: int):
    path = SHARED / rel
    if not path.is_file():
        pytest.skip(f"../shared/data/{rel} not present")
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()[:n]]


# ---------------------------------------------------------------- one fake layout per builder: (args, checks)
def xtd10(t: Path):
    names = ["COCO_train2014_000000000009.jpg", "COCO_train2014_000000000025.jpg", "COCO_train2014_000000000030.jpg"]
    lines(t / "xtd" / "XTD10" / "test_image_names.txt", names)
    for code, folder in (("en", "XTD10"), ("es", "XTD10"), ("zh", "XTD10"), ("de", "MIC"), ("jp", "STAIR")):
        lines(t / "xtd" / folder / f"test_1kcaptions_{code}.txt", [f"{code} caption {i}" for i in range(3)])
    for i, n in enumerate(names):
        jpg(t / "coco" / "train2014" / n, i)
    return (["--captions", t / "xtd", "--images", t / "coco"], 3, {"en", "es", "zh", "de", "ja"},
            t / "coco" / "train2014" / names[1])


def multi30k(t: Path):
    rows = shared_rows("multi30k/test_2016_flickr.jsonl", 4)  # real captions; images stand-ins
    raw = t / "m30k" / "data" / "task1"
    lines(raw / "image_splits" / "test_2016_flickr.txt", [r["image"] for r in rows])
    for lang in ("en", "de", "fr", "cs"):
        lines(raw / "raw" / f"test_2016_flickr.{lang}.gz", [r["captions"][lang] for r in rows], gz=True)
    for i, r in enumerate(rows):
        jpg(t / "flickr30k-images" / r["image"], i)
    return (["--root", t / "m30k", "--images", t / "flickr30k-images"], 4, {"en", "de", "fr", "cs"},
            t / "flickr30k-images" / rows[2]["image"])


def xm3600(t: Path):
    items = [{"image/key": f"{i:016x}", "image/locale": "en",
              **{lang: {"caption": [f"{lang} {i} a", f"{lang} {i} b"], "caption/tokenized": ["x"]}
                 for lang in ("en", "vi", "th")}} for i in range(2)]
    lines(t / "xm" / "captions.jsonl", [json.dumps(x, ensure_ascii=False) for x in items])
    for i, x in enumerate(items):
        jpg(t / "xm" / "images" / f"{x['image/key']}.jpg", i)
    return (["--captions", t / "xm" / "captions.jsonl", "--images", t / "xm" / "images"], 2, {"en", "vi", "th"},
            t / "xm" / "images" / f"{items[0]['image/key']}.jpg")


def karpathy(t: Path):
    images = [{"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "split": s, "cocoid": i,
               "sentences": [{"raw": f"a photo {i} {j}", "tokens": ["a"]} for j in range(5)]}
              for i, s in enumerate(["test", "train", "test"])]
    (t / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    for x in images:
        jpg(t / "coco" / "val2014" / x["filename"], x["cocoid"])
    return (["--annotations", t / "dataset_coco.json", "--images", t / "coco"], 2, {"en"},
            t / "coco" / "val2014" / images[2]["filename"])


def msrvtt(t: Path):
    clips = [r for r in shared_rows("video/manifest.jsonl", 5) if r["source"] == "MSR-VTT"][:2]  # real clips
    videos = t / "msrvtt_videos"
    videos.mkdir()
    for r in clips:
        shutil.copy(SHARED / "video" / r["file"], videos / r["file"])
    lines(t / "MSRVTT_JSFUSION_test.csv", ["key,vid_key,video_id,sentence"] +
          [f"ret{i},msr{r['video_id']},{r['video_id']},{r['captions']['en'][0]}" for i, r in enumerate(clips)])
    return (["--videos", videos, "--csv", t / "MSRVTT_JSFUSION_test.csv"], 2, {"en"}, videos / clips[1]["file"])


def clotho(t: Path):
    lines(t / "clotho_captions_evaluation.csv", ["file_name,caption_1,caption_2,caption_3,caption_4,caption_5"] +
          [f"rain {i}.wav,rain falls,water drips,a storm,drops on a roof,wet weather" for i in range(2)])
    for i in range(2):
        wav(t / "evaluation" / f"rain {i}.wav", i)
    return (["--captions", t / "clotho_captions_evaluation.csv", "--audio", t / "evaluation"], 2, {"en"},
            t / "evaluation" / "rain 1.wav")


def audiocaps(t: Path):
    lines(t / "test.csv", ["audiocap_id,youtube_id,start_time,caption", "1,abc,30,a dog barks",
                           "2,abc,30,barking", "3,xyz,0,an engine idles"])
    wav(t / "ac" / "abc_30.wav", 0)
    wav(t / "ac" / "Yxyz.wav", 1)
    return (["--captions", t / "test.csv", "--audio", t / "ac"], 2, {"en"}, t / "ac" / "Yxyz.wav")


def vqav2(t: Path):
    qs = [{"image_id": 42, "question": "What color is the bus?", "question_id": 42000},
          {"image_id": 7, "question": "How many dogs?", "question_id": 7001}]
    ann = [{"question_id": q["question_id"], "image_id": q["image_id"], "question_type": "what color",
            "answer_type": "other", "answers": [{"answer": "red", "answer_id": k + 1} for k in range(10)]} for q in qs]
    (t / "q.json").write_text(json.dumps({"questions": qs, "data_subtype": "val2014"}))
    (t / "a.json").write_text(json.dumps({"annotations": ann, "data_subtype": "val2014"}))
    for q in qs:
        jpg(t / "coco" / "val2014" / f"COCO_val2014_{q['image_id']:012d}.jpg", q["image_id"])
    return (["--questions", t / "q.json", "--annotations", t / "a.json", "--images", t / "coco"], 2, set(),
            t / "coco" / "val2014" / "COCO_val2014_000000000007.jpg")


def image_folder(t: Path):
    for cls in ("golden_retriever", "tabby_cat"):
        for i in range(2):
            jpg(t / "imgs" / cls / f"{i}.jpg", i)
    lines(t / "names.csv", ["id,en,de", "golden_retriever,golden retriever,Golden Retriever",
                            "tabby_cat,tabby cat,getigerte Katze"])
    return (["--root", t / "imgs", "--names", t / "names.csv"], 4, set(), None)  # the folders are the list


def csv_fsdd(t: Path):
    rows = shared_rows("audio_fsdd/manifest.jsonl", 300)[::15]  # 20 real recordings, 2 per digit
    lines(t / "fsdd.csv", ["audio,label"] + [f"{SHARED / 'audio_fsdd' / r['file']},{r['digit']}" for r in rows])
    names = yaml.safe_load((REPO / "mlmm" / "evaluation" / "zeroshot.yaml").read_text())["datasets"]["fsdd"]["classes"]
    lines(t / "digits.csv", ["id,en,de,fr,es"] + [f"{d},{names['en'][d]},{names['de'][d]},{names['fr'][d]},"
                                                  f"{names['es'][d]}" for d in range(10)])
    return (["--csv", t / "fsdd.csv", "--names", t / "digits.csv"], 20, set(), None)


LAYOUTS = {"xtd10": xtd10, "multi30k": multi30k, "xm3600": xm3600, "karpathy": karpathy, "msrvtt": msrvtt,
           "clotho": clotho, "audiocaps": audiocaps, "vqav2": vqav2, "image-folder": image_folder, "csv": csv_fsdd}


BUILD = runpy.run_path(str(REPO / "eval" / "build_dataset.py"))["main"]  # the CLI, in this process


def run(args) -> int:
    return BUILD([str(a) for a in args])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_builder_writes_eval_shards_and_names_a_missing_file(name, tmp_path, capsys):
    from mlmm.data.shards import iter_samples, resolve_shards

    args, n, langs, removable = LAYOUTS[name](tmp_path)
    assert run([name, *args, "--out", tmp_path / "out"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["n_samples"] == n and set(index["languages"]) == langs and not index["skipped"]
    samples = list(iter_samples(resolve_shards(str(tmp_path / "out"))))
    assert len(samples) == n and len({s["__key__"] for s in samples}) == n
    if name in ("image-folder", "csv"):
        classes = yaml.safe_load((tmp_path / "out" / "classes.yaml").read_text())
        assert all(isinstance(s["json"]["label"], int) for s in samples)
        assert set(classes["classes"]) == ({"en", "de"} if name == "image-folder" else {"en", "de", "fr", "es"})
    if name == "vqav2":
        assert samples[0]["json"]["answers"]["en"] == ["red"] * 10 and samples[0]["json"]["question"]["en"]
    if removable is None:
        return
    removable.unlink()  # a media file goes missing: one line naming it; --skip-missing builds the rest
    assert run([name, *args, "--out", tmp_path / "out2"]) == 2
    err = capsys.readouterr().err.strip()
    named = str(removable) if name != "audiocaps" else f"{removable.parent}/3.wav (also tried xyz_0, Yxyz, xyz"
    assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err, err
    assert not (tmp_path / "out2").exists()  # checked before anything is written
    assert run([name, *args, "--out", tmp_path / "out3", "--skip-missing"]) == 0
    report = json.loads((tmp_path / "out3" / "build.json").read_text())
    assert report["n_items"] == n - 1 and len(report["missing"]) == 1 and report["missing"][0].startswith(named)


@pytest.mark.parametrize("name", ["xtd10", "multi30k", "clotho", "vqav2"])
def test_a_missing_annotation_file_is_one_line_naming_it(name, tmp_path, capsys):
    args, *_ = LAYOUTS[name](tmp_path)
    first = Path(args[1])
    gone = {"xtd10": first / "XTD10" / "test_image_names.txt",
            "multi30k": first / "data" / "task1" / "image_splits" / "test_2016_flickr.txt"}.get(name, first)
    gone.unlink()
    assert run([name, *args, "--out", tmp_path / "out"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(gone) in err and "not found" in err, err
    assert not (tmp_path / "out").exists()


def test_msrvtt_full_annotations_and_cli_script(tmp_path, capsys):
    args, *_ = msrvtt(tmp_path)
    videos = Path(args[1])
    ids = sorted(p.stem for p in videos.iterdir())
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps({
        "videos": [{"video_id": ids[0], "split": "test"}, {"video_id": ids[1], "split": "train"}],
        "sentences": [{"video_id": v, "caption": f"caption {k} of {v}", "sen_id": k} for v in ids for k in range(3)]}))
    argv = ["build_dataset.py", "msrvtt", "--videos", str(videos), "--annotations", str(tmp_path / "MSRVTT_data.json"),
            "--out", str(tmp_path / "out")]
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as done:
        mp.setattr(sys, "argv", argv)
        runpy.run_path(str(REPO / "eval" / "build_dataset.py"), run_name="__main__")
    assert done.value.code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        f"msrvtt: 1 items, languages ['en'], 0 missing, 0 skipped -> {tmp_path / 'out'}"
    from mlmm.data.shards import iter_samples, resolve_shards

    (sample,) = iter_samples(resolve_shards(str(tmp_path / "out")))
    assert sample["__key__"] == ids[0] and len(sample["json"]["captions"]["en"]) == 3  # every caption of the split
