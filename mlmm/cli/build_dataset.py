"""Build mlmm eval shards from a standard benchmark's files, one command per dataset.

    mlmm-build-dataset xtd10 --captions XTD10 --images coco/train2014 --out shards/xtd10
    mlmm-build-dataset multi30k --root multi30k-dataset --images flickr30k-images --out shards/multi30k
    mlmm-build-dataset xm3600 --captions xm3600/captions.jsonl --images xm3600/images --out shards/xm3600
    mlmm-build-dataset karpathy --annotations dataset_coco.json --images coco --out shards/coco_5k
    mlmm-build-dataset msrvtt --videos MSRVTT/videos/all --csv MSRVTT_JSFUSION_test.csv --out shards/msrvtt
    mlmm-build-dataset clotho --captions clotho_captions_evaluation.csv --audio evaluation --out shards/clotho
    mlmm-build-dataset audiocaps --captions audiocaps/test.csv --audio audiocaps/test --out shards/audiocaps
    mlmm-build-dataset vqav2 --questions Q.json --annotations A.json --images coco/val2014 --out shards/vqa
    mlmm-build-dataset image-folder --root my_classes --names names.csv --out shards/my_classes
    mlmm-build-dataset csv --csv labels.csv --names names.csv --out shards/my_set

Every path is checked first: a missing file is a one-line error naming it (exit 2); ``--skip-missing`` leaves out
the items whose media file is missing and lists them in OUT/build.json. See mlmm/evaluation/builders/ for layouts.

Console command ``mlmm-build-dataset`` (installed by pip); ``python eval/build_dataset.py`` is the same.
"""
import argparse
import sys

from mlmm.evaluation.builders import build
from mlmm.evaluation.builders.common import BuildError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="dataset", required=True)

    def dataset(name: str, text: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=text)
        s.add_argument("--out", required=True, help="output shard folder")
        s.add_argument("--skip-missing", action="store_true", help="leave out items whose media file is missing")
        s.add_argument("--shard-size", type=int, default=1000)
        return s

    s = dataset("xtd10", "XTD10: 1000 COCO images, captions in 11 languages")
    s.add_argument("--captions", required=True, help="the XTD10 repo (XTD10/, MIC/, STAIR/) or its XTD10/ folder")
    s.add_argument("--images", required=True, help="COCO images (the train2014 files XTD10 names)")
    s.add_argument("--languages", default=None, help="comma list (default: every caption file)")
    s = dataset("multi30k", "Multi30K: Flickr30k images, captions en/de/fr/cs")
    s.add_argument("--root", required=True, help="Multi30K checkout (data/task1/raw, data/task1/image_splits)")
    s.add_argument("--images", required=True, help="Flickr30k images folder")
    s.add_argument("--split", default="test_2016_flickr")
    s.add_argument("--languages", default=None, help="comma list (default: every caption file of the split)")
    s = dataset("xm3600", "Crossmodal-3600: 3600 images, captions in 36 languages")
    s.add_argument("--captions", required=True, help="captions.jsonl")
    s.add_argument("--images", required=True, help="images folder (<key>.jpg)")
    s.add_argument("--languages", default=None, help="comma list (default: all)")
    s = dataset("karpathy", "COCO / Flickr30k Karpathy splits (dataset_coco.json, dataset_flickr30k.json)")
    s.add_argument("--annotations", required=True, help="dataset_coco.json or dataset_flickr30k.json")
    s.add_argument("--images", required=True, help="images folder (<filepath>/<filename> or <filename>)")
    s.add_argument("--split", default="test")
    s = dataset("msrvtt", "MSR-VTT videos with the 1k-A test CSV or the full annotation JSON")
    s.add_argument("--videos", required=True, help="videos folder (<video_id>.mp4)")
    s.add_argument("--csv", default=None, help="MSRVTT_JSFUSION_test.csv (key, vid_key, video_id, sentence)")
    s.add_argument("--annotations", default=None, help="MSRVTT_data.json (videos + sentences)")
    s.add_argument("--split", default="test", help="with --annotations")
    s = dataset("clotho", "Clotho: audio + 5 captions each")
    s.add_argument("--captions", required=True, help="clotho_captions_<split>.csv")
    s.add_argument("--audio", required=True, help="the split's audio folder")
    s = dataset("audiocaps", "AudioCaps: the CSV + the audio you downloaded")
    s.add_argument("--captions", required=True, help="<split>.csv (audiocap_id, youtube_id, start_time, caption)")
    s.add_argument("--audio", required=True, help="audio folder")
    s.add_argument("--pattern", default=None, help="file name format, e.g. {youtube_id}_{start_time}")
    s = dataset("vqav2", "VQAv2: questions + annotations + COCO images")
    s.add_argument("--questions", required=True, help="v2_OpenEnded_mscoco_<split>_questions.json")
    s.add_argument("--annotations", required=True, help="v2_mscoco_<split>_annotations.json")
    s.add_argument("--images", required=True, help="COCO images folder (COCO_<split>_<id>.jpg)")
    s.add_argument("--limit", type=int, default=None, help="only the first N questions")
    s = dataset("image-folder", "classification: one sub-folder of images per class")
    s.add_argument("--root", required=True, help="folder with one sub-folder per class")
    s.add_argument("--names", default=None, help="class names per language: CSV id,<lang>,... or YAML")
    s = dataset("csv", "classification: a CSV of media paths (image, audio or video column) and labels")
    s.add_argument("--csv", required=True, help="CSV with an image|audio|video column and a label column")
    s.add_argument("--names", default=None, help="class names per language: CSV id,<lang>,...")
    s.add_argument("--media-root", default=None, help="folder the media paths are relative to (default: the CSV's)")
    return p


def main(argv=None) -> int:
    args = vars(parser().parse_args(argv))
    name, out = args.pop("dataset"), args.pop("out")
    opts = {k: args.pop(k) for k in ("skip_missing", "shard_size")}
    if args.get("languages"):
        args["languages"] = args["languages"].split(",")
    try:
        report = build(name, out, **opts, **args)
    except (BuildError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{name}: {report['n_items']} items, languages {report['languages']}, {len(report['missing'])} missing, "
          f"{len(report['skipped'])} skipped -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
