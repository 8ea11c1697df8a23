"""Exact text trimming in the evaluator (issue 23 item 3): a causal open_clip text tower pooled at the end-of-text
token runs each length-sorted batch only up to its last pooled position, and gives open_clip's own ``encode_text``
embeddings (to 1e-5) in the input's order; towers that attend to the padding or pool elsewhere are never trimmed."""
import json
import random

import pytest
import torch
import torch.nn.functional as F

ATOL = 1e-5
CONTEXT = 32
TEXTS = ["a dog", "A man in an orange hat starring at something.", "x",
         "A Boston Terrier is running on lush green grass in front of a white fence.", "two people",
         "A girl in a pink dress climbs into a wooden playhouse while her sister watches from the stairs.",
         "cats", "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.", "a red circle on a blue square", "",
         "Un terrier de Boston court sur l'herbe verdoyante devant une clôture blanche."]


def tiny_open_clip(tmp_path, name: str, **text_cfg):
    """An open_clip model from a config JSON (2-layer 32-wide text tower, ``text_cfg`` overrides) with random
    weights saved to a file: -> (the ``--model`` spec, open_clip's own model loaded from it, its tokenizer)."""
    import open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                            "head_width": 16},
           "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                        **text_cfg}}
    if text_cfg:
        cfg["custom_text"] = True  # CustomTextCLIP: open_clip's TextTransformer with these options
    (tmp_path / "cfg").mkdir(exist_ok=True)
    (tmp_path / "cfg" / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "cfg")
    torch.manual_seed(0)
    weights = tmp_path / f"{name}.pt"
    torch.save(open_clip.create_model(name).state_dict(), weights)
    ref = open_clip.create_model(name, pretrained=str(weights)).eval()
    return f"open_clip:{name},pretrained={weights},config={tmp_path / 'cfg'}", ref, open_clip.get_tokenizer(name)


def full_length(ref, tokenizer, texts) -> torch.Tensor:
    """open_clip's own embeddings: ``encode_text`` on every position, one batch."""
    with torch.no_grad():
        return F.normalize(ref.encode_text(tokenizer(texts)).float(), dim=-1)


def test_causal_tower_is_trimmed_in_sorted_batches_and_equals_encode_text_in_input_order(tmp_path):
    from mlmm.evaluation.models import load_model

    spec, ref, tokenizer = tiny_open_clip(tmp_path, "mlmm-trim-causal")
    model = load_model(spec)
    assert model.trimmed is not None and model.trimmed.pool_type == "argmax"
    texts = TEXTS * 3
    random.Random(0).shuffle(texts)
    seen = []  # sequence length of every batch the text transformer ran
    hook = model.model.transformer.register_forward_pre_hook(lambda m, args, kw: seen.append(args[0].shape[1]),
                                                             with_kwargs=True)
    z = model.encode_text(texts, batch_size=4)  # [N, E]
    hook.remove()
    torch.testing.assert_close(z, full_length(ref, tokenizer, texts), rtol=0, atol=ATOL)  # rows in input order
    lengths = sorted(int(i) + 1 for i in tokenizer(texts).argmax(-1))
    assert seen == [max(lengths[i:i + 4]) for i in range(0, len(texts), 4)]  # tight, length-sorted batches
    assert max(seen) < CONTEXT and sum(seen) * 4 < 0.6 * len(texts) * CONTEXT


@pytest.mark.parametrize("text_cfg", [
    {"no_causal_mask": True, "pool_type": "last"},  # SigLIP-style: bidirectional, pooled on the last position
    {"no_causal_mask": True},  # bidirectional, pooled at EOT: every position attends to the padding
    {"pool_type": "last"},  # causal but pooled on the last position, after the padding
], ids=["siglip-style", "bidirectional-argmax", "causal-last"])
def test_towers_that_read_the_padding_are_not_trimmed(tmp_path, text_cfg):
    from mlmm.evaluation.models import load_model

    spec, ref, tokenizer = tiny_open_clip(tmp_path, "mlmm-trim-" + "-".join(f"{k}{v}" for k, v in text_cfg.items()),
                                          **text_cfg)
    model = load_model(spec)
    assert model.trimmed is None and model.text_order(TEXTS) is None
    full = full_length(ref, tokenizer, TEXTS)
    # what trimming would give for this tower (its TextTransformer takes shorter inputs when it has no causal mask
    # to slice): a different embedding, so the equality below fails if the evaluator trimmed it
    tokens = tokenizer(TEXTS)
    if ref.text.attn_mask is None:
        with torch.no_grad():
            cut = F.normalize(ref.encode_text(tokens[:, :int(tokens.argmax(-1).max()) + 1]).float(), dim=-1)
        assert (cut - full).abs().max() > 100 * ATOL
    torch.testing.assert_close(model.encode_text(TEXTS, batch_size=4), full, rtol=0, atol=ATOL)


def test_retrieval_metrics_are_identical_with_and_without_trimming(tmp_path):
    from mlmm.data.write_shards import write_shards
    from mlmm.evaluation.models import load_model
    from mlmm.evaluation.runner import evaluate_retrieval
    from mlmm.synthetic.shapes import generate

    generate(tmp_path / "gen", n_images=24, n_videos=0, n_audio=0, size=32, seed=5, progress=False)
    write_shards(tmp_path / "gen" / "manifest.jsonl", tmp_path / "shards", shard_size=12, progress=False)
    spec, _, _ = tiny_open_clip(tmp_path, "mlmm-trim-retrieval")
    model = load_model(spec)
    assert model.trimmed is not None

    def run():
        return {r["language"]: r["metrics"] for r in evaluate_retrieval(
            model, str(tmp_path / "shards"), languages=["en", "de", "fr"], batch_size=5, progress=False)}

    trimmed = run()
    model.trimmed = None  # open_clip's encode_text on all CONTEXT positions, input order
    full = run()
    assert set(trimmed) == {"en", "de", "fr"}
    for lang, metrics in full.items():
        assert metrics["n_texts"] > 5  # several text batches, so the sorted order was used
        for k, v in metrics.items():
            assert abs(trimmed[lang][k] - v) <= ATOL, (lang, k, trimmed[lang][k], v)


def test_split_encode_cuts_chunks_in_the_given_order_and_returns_the_input_order():
    from mlmm.evaluation.distributed import split_encode

    items = [5, 1, 4, 2, 3]
    chunks = []

    def encode(chunk):
        chunks.append(list(chunk))
        return torch.tensor(chunk, dtype=torch.float32)[:, None] * 10  # [n, 1]

    out = split_encode(encode, items, 2, order=sorted(range(5), key=items.__getitem__))
    assert chunks == [[1, 2], [3, 4], [5]]
    assert out[:, 0].tolist() == [50, 10, 40, 20, 30]


def test_transformers_clip_text_in_length_order_equals_one_string_at_a_time(tmp_path):
    """HF CLIP (causal, read at one position): batches sorted by length, padded to their longest string, give each
    string's own embedding (no padding at all) in the input's order; a model that would pool at the first pad
    (eos id = pad id, absent from the strings) keeps the order given."""
    import eval_zoo  # tests/ is on sys.path under pytest

    from mlmm.evaluation.models import load_model

    eval_zoo.build_shards(tmp_path, n_images=4)  # + the BPE tokenizer the tiny CLIPModel uses
    model = load_model(f"transformers:{eval_zoo.transformers_clip(tmp_path)}")
    end = model.tokenizer("a")["input_ids"][-1]  # the id this tokenizer ends every string with
    model.model.text_model.eos_token_id = end  # pooled at each string's end, as CLIP's
    texts = [c for c in ("a red circle", "a big blue square on a small green triangle", "ein roter Kreis", "a",
                         "un triangle vert et un carré bleu et un cercle rouge", "green") for _ in range(2)]
    order = model.text_order(texts)
    assert order is not None and order != list(range(len(texts)))
    with torch.no_grad():
        alone = torch.cat([F.normalize(model._encode_text([t]).float(), dim=-1) for t in texts])  # [N, E]
    torch.testing.assert_close(model.encode_text(texts, batch_size=3), alone, rtol=0, atol=ATOL)
    # pooled at the first pad: a short string's embedding would depend on its batch's longest string
    model.model.text_model.eos_token_id = model.tokenizer.pad_token_id
    assert model.text_order(texts) is None
    with torch.no_grad():
        padded = F.normalize(model._encode_text(["a", texts[2]]).float(), dim=-1)[0]
        assert (padded - F.normalize(model._encode_text(["a"]).float(), dim=-1)[0]).abs().max() > 100 * ATOL


def test_an_open_clip_teacher_encodes_trimmed_sorted_batches_equal_to_encode_text(tmp_path):
    """The distillation teacher takes the same cut (precompute and online targets): open_clip's embeddings at full
    length, in the input's order, from tight length-sorted batches."""
    from mlmm.distill.teacher import TeacherConfig, build_teacher

    spec, ref, tokenizer = tiny_open_clip(tmp_path, "mlmm-trim-teacher")
    weights = spec.split("pretrained=")[1].split(",")[0]
    teacher = build_teacher(TeacherConfig(kind="open_clip", arch="mlmm-trim-teacher", checkpoint=weights,
                                          model_config=str(tmp_path / "cfg" / "mlmm-trim-teacher.json"), batch_size=4),
                            cache=False)
    assert teacher._trim is not None
    texts = TEXTS * 2
    random.Random(1).shuffle(texts)
    seen = []
    hook = teacher.model.transformer.register_forward_pre_hook(lambda m, args, kw: seen.append(args[0].shape[1]),
                                                               with_kwargs=True)
    z = teacher.encode_text(texts)  # [N, E]
    hook.remove()
    torch.testing.assert_close(z, full_length(ref, tokenizer, texts), rtol=0, atol=ATOL)
    lengths = sorted(int(i) + 1 for i in tokenizer(texts).argmax(-1))
    assert seen == [max(lengths[i:i + 4]) for i in range(0, len(texts), 4)]
