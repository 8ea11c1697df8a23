"""Retrieval evaluation per language of an mlmm export on WebDataset shards.

    python eval/run_retrieval.py --checkpoint runs/demo/export --shards data/test \
        --languages en,de,vi --out results.json

Writes {"results": [{"task", "dataset", "language", "n", "metrics": {...}}]} and prints a table.

Distilled students (mlmm.evaluation.crosslingual):
    --text-tower student --image-tower teacher [--teacher CFG.yaml]   student text(L) -> frozen teacher image
        (teacher: from CFG, else the one recorded in the export's config.json)
    --parallel FILE.jsonl --languages de,fr --target-language en       text(L) <-> text(target), task text-text
"""
import argparse
import sys

import torch

import mlmm
from mlmm.evaluation import markdown_table, save_results
from mlmm.evaluation.runner import evaluate_retrieval


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="export folder (config.json + model.safetensors)")
    p.add_argument("--shards", default=None, help="shard folder, glob or comma list")
    p.add_argument("--parallel", default=None, help="parallel-caption JSONL: text(L) -> text(target) retrieval")
    p.add_argument("--target-language", default="en", help="with --parallel: the gallery language")
    p.add_argument("--text-tower", choices=("student",), default="student", help="text embeddings (the export)")
    p.add_argument("--image-tower", choices=("student", "teacher"), default="student",
                   help="teacher: the frozen distillation teacher's image tower")
    p.add_argument("--teacher", default=None, help="YAML with the teacher (default: the export's config.json)")
    p.add_argument("--languages", default=None, help="comma list; default: every language in the shards")
    p.add_argument("--dataset", default=None, help="dataset name for the report (default: the shards path)")
    p.add_argument("--out", default="results.json")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rerank-topk", type=int, default=0,
                   help="re-rank each query's global top-K with the model's DI-vTR interaction head (0 = off)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.parallel or args.image_tower == "teacher":
        from mlmm.evaluation.crosslingual import load_student

        model = load_student(args.checkpoint, device=args.device)
    else:
        model = mlmm.from_pretrained(args.checkpoint, device=args.device)
    langs = args.languages.split(",") if args.languages else None
    if args.parallel or args.image_tower == "teacher":
        return _crosslingual(args, model, langs)
    if not args.shards:
        p.error("--shards is required (or --parallel)")
    records = evaluate_retrieval(model, args.shards, languages=langs, dataset=args.dataset or args.shards,
                                 batch_size=args.batch_size, device=args.device, rerank_topk=args.rerank_topk)
    if not records:
        print(f"no retrieval task found in {args.shards} for languages {langs}", file=sys.stderr)
        return 1
    save_results(records, args.out)
    print(markdown_table(records))
    print(f"\nwrote {args.out}")
    return 0


def _crosslingual(args, model, langs) -> int:
    from mlmm.evaluation import crosslingual

    if args.parallel:
        if not langs:
            print("--parallel needs --languages", file=sys.stderr)
            return 2
        records = crosslingual.parallel_text_retrieval(model, args.parallel, langs, args.target_language,
                                                       dataset=args.dataset, batch_size=args.batch_size,
                                                       device=args.device)
    else:
        from mlmm.distill.precompute import teacher_from_yaml
        from mlmm.distill.teacher import build_teacher

        if not args.shards:
            print("--image-tower teacher needs --shards", file=sys.stderr)
            return 2
        cfg = teacher_from_yaml(args.teacher)[0] if args.teacher else crosslingual.teacher_config_from_export(
            args.checkpoint)
        teacher = build_teacher(cfg).to(args.device)
        records = crosslingual.student_text_to_teacher_image(model, teacher, args.shards, languages=langs,
                                                             dataset=args.dataset or args.shards,
                                                             batch_size=args.batch_size, device=args.device)
    if not records:
        print("no cross-lingual retrieval task found", file=sys.stderr)
        return 1
    save_results(records, args.out)
    print(markdown_table(records))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
