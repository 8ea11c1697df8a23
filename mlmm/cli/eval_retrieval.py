"""Retrieval evaluation per language of any model (mlmm, open_clip, transformers, M-CLIP-style) on shards.

    mlmm-eval-retrieval --model runs/demo --shards data/test --languages en,de,vi --out results.json
    mlmm-eval-retrieval --model open_clip:ViT-B-32,pretrained=laion2b_s34b_b79k --shards data/xtd10
    torchrun --nproc_per_node 4 eval/run_retrieval.py --model ... --shards ...   # ranks split the shards

Writes {"results": [{"task", "dataset", "language", "n", "metrics": {...}, "model", "pretrained", "skipped"}]}
and prints a table. ``--model`` forms: ``python eval/run_retrieval.py --help``.

Distilled students (mlmm.evaluation.crosslingual; --model is an mlmm export or run folder):
    --text-tower student --image-tower teacher [--teacher CFG.yaml]   student text(L) -> frozen teacher image
        (teacher: from CFG, else the one recorded in the export's config.json)
    --parallel FILE.jsonl --languages de,fr --target-language en       text(L) <-> text(target), task text-text

Console command ``mlmm-eval-retrieval`` (installed by pip); ``python eval/run_retrieval.py`` is the same.
"""
import argparse
import sys

from mlmm.evaluation.cli import add_model_arguments, device_of, model_spec, open_model, report
from mlmm.evaluation.distributed import cleanup, init_eval_distributed
from mlmm.evaluation.runner import evaluate_retrieval


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--shards", default=None, help="shard folder, glob, brace range or comma list")
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
    args = p.parse_args(argv)
    langs = args.languages.split(",") if args.languages else None
    if args.parallel or args.image_tower == "teacher":
        return _crosslingual(args, langs)
    if not args.shards:
        p.error("--shards is required (or --parallel)")
    init_eval_distributed()
    try:
        model = open_model(args)
        if model is None:
            return 2
        records = evaluate_retrieval(model, args.shards, languages=langs, dataset=args.dataset or args.shards,
                                     batch_size=args.batch_size, rerank_topk=args.rerank_topk,
                                     num_workers=args.workers)
        return report(records, args.out, f"no retrieval task found in {args.shards} for languages {langs}")
    finally:
        cleanup()


def _crosslingual(args, langs) -> int:
    from mlmm.evaluation import crosslingual
    from mlmm.hub.download import resolve_pretrained

    try:
        folder = resolve_pretrained(model_spec(args) or "")
        model = crosslingual.load_student(folder, device=device_of(args))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    if args.parallel:
        if not langs:
            print("--parallel needs --languages", file=sys.stderr)
            return 2
        records = crosslingual.parallel_text_retrieval(model, args.parallel, langs, args.target_language,
                                                       dataset=args.dataset, batch_size=args.batch_size,
                                                       device=device_of(args))
    else:
        from mlmm.distill.precompute import teacher_from_yaml
        from mlmm.distill.teacher import build_teacher

        if not args.shards:
            print("--image-tower teacher needs --shards", file=sys.stderr)
            return 2
        cfg = teacher_from_yaml(args.teacher)[0] if args.teacher else crosslingual.teacher_config_from_export(folder)
        teacher = build_teacher(cfg).to(device_of(args))
        records = crosslingual.student_text_to_teacher_image(model, teacher, args.shards, languages=langs,
                                                             dataset=args.dataset or args.shards,
                                                             batch_size=args.batch_size, device=device_of(args))
    return report(records, args.out, "no cross-lingual retrieval task found")


if __name__ == "__main__":
    sys.exit(main())
