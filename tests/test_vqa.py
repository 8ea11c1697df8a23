"""VQA: official VQAv2 accuracy (hand cases), fusion masking, and a tiny VQA head learning the generated set."""
from pathlib import Path

import pytest
import torch

from mlmm.evaluation.vqa import (majority_answer, majority_baseline, normalize_answer, process_punctuation,
                                 soft_scores, vqa_accuracy, vqa_report)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ metric
@pytest.mark.parametrize("matches, expected", [
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),  # 0.3: a subset without the match has 1/3, with it removed 0
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
    (3, (3 * (2 / 3) + 7 * 1.0) / 10),  # 0.9: removing one of the 3 leaves 2 -> 2/3
    (4, 1.0),
    (10, 1.0),
])
def test_leave_one_out_accuracy_by_hand(matches, expected):
    gts = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("cat", gts) == pytest.approx(expected)


def test_ties_between_answers():
    five_five = ["red"] * 5 + ["blue"] * 5
    assert vqa_accuracy("red", five_five) == vqa_accuracy("blue", five_five) == 1.0
    three_three_four = ["red"] * 3 + ["blue"] * 3 + ["green"] * 4
    assert vqa_accuracy("red", three_three_four) == vqa_accuracy("blue", three_three_four) == pytest.approx(0.9)
    assert vqa_accuracy("green", three_three_four) == 1.0
    # majority answer ties are broken alphabetically (deterministic baselines)
    assert majority_answer(five_five) == "blue"
    assert majority_answer(["y", "x", "y", "x", "z"]) == "x"
    assert majority_answer(["a", "an", "the", "red"]) == ""  # articles normalise to the empty answer


def test_soft_scores_equal_the_accuracy_each_answer_would_get():
    gts = ["2"] * 6 + ["3"] * 3 + ["4"]
    scores = soft_scores(gts)
    for a in ("2", "3", "4"):
        assert scores[a] == pytest.approx(vqa_accuracy(a, gts))
    assert scores == pytest.approx({"2": 1.0, "3": 0.9, "4": 0.3})


@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"), ("none", "0"), ("ten dogs", "10 dogs"),  # number words -> digits
    ("The dog", "dog"), ("a cat on an apple", "cat on apple"),  # articles dropped
    ("dont", "don't"), ("isnt it", "isn't it"), ("Im", "im"),  # contractions (lower-cased key 'im' is not listed)
    ("yes!", "yes"), ("yes.", "yes"), ("what?", "what"),
    ("3.5", "3.5"), ("1,000", "1000"), ("ice-cream", "ice cream"), ("ice - cream", "ice cream"),
    ("  multiple   spaces\t", "multiple spaces"), ("(left)", "left"), ("it's", "it's"),
])
def test_official_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_official_quirks_are_kept():
    # identical human answers are NOT normalised (the official script assumes normalised annotations)
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0
    # ...but when they disagree, punctuation is processed (digits / articles are not)
    assert vqa_accuracy("yes", ["yes."] * 5 + ["yes!"] * 5) == 1.0
    assert vqa_accuracy("2", ["two"] * 5 + ["2."] * 5) == 1.0  # the five "2." match, "two" never does
    assert vqa_accuracy("2", ["two"] * 8 + ["2"] * 2) == pytest.approx(0.6)
    # the period regex removes a period that is not followed by a digit
    assert process_punctuation("a.b 3.5 end.") == "ab 3.5 end"


def test_report_per_question_and_answer_type():
    questions = [{"answers": ["red"] * 10, "question_type": "color", "answer_type": "other"},
                 {"answers": ["2"] * 3 + ["3"] * 7, "question_type": "count", "answer_type": "number"},
                 {"answers": ["yes"] * 10, "question_type": "exists", "answer_type": "yes/no"}]
    r = vqa_report(["red", "2", "no"], questions)
    assert r["accuracy"] == pytest.approx(100 * (1.0 + 0.9 + 0.0) / 3)
    assert r["acc_qtype/count"] == pytest.approx(90.0) and r["acc_atype/yes/no"] == 0.0
    # global majority: the three per-question majorities tie (1 each) -> alphabetical "3": right only on question 2
    assert majority_baseline([q["answers"] for q in questions], questions) == pytest.approx(100 * (0 + 1.0 + 0) / 3)
    by_type = majority_baseline([(q["answers"], q["question_type"]) for q in questions], questions, by="question_type")
    assert by_type == pytest.approx(100 * (1.0 + 1.0 + 1.0) / 3)


# ------------------------------------------------------------------------------------------ fusion
def test_fusion_ignores_padding_and_is_causal_when_asked():
    from mlmm.models.fusion.cross_attention import CrossAttentionFusion

    torch.manual_seed(0)
    f = CrossAttentionFusion(16, 2, 2, query_dim=8, context_dim=12).eval()
    q, c = torch.randn(2, 5, 8), torch.randn(2, 7, 12)
    qm = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    cm = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1] * 7], dtype=torch.bool)
    out = f(q, c, qm, cm)
    q2, c2 = q.clone(), c.clone()
    q2[0, 3:] = 99.0
    c2[0, 4:] = -50.0
    out2 = f(q2, c2, qm, cm)
    torch.testing.assert_close(out[0, :3], out2[0, :3])  # real queries: same output whatever the padding holds
    torch.testing.assert_close(out[1], out2[1])
    dec = CrossAttentionFusion(16, 2, 2, context_dim=12, causal=True).eval()
    x = torch.randn(1, 6, 16)
    y = dec(x, c[:1], None, cm[:1])
    x2 = x.clone()
    x2[0, 4:] += 5.0
    torch.testing.assert_close(dec(x2, c[:1], None, cm[:1])[0, :4], y[0, :4])  # the past ignores the future
    assert not torch.allclose(dec(x2, c[:1], None, cm[:1])[0, 4:], y[0, 4:])


# ------------------------------------------------------------------------------------------ learning
@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory):
    from mlmm.data.answers import write_answer_vocab
    from mlmm.data.tokenization import train_tokenizer
    from mlmm.synthetic.vqa import generate_vqa
    from mlmm.data.write_shards import write_shards

    root = tmp_path_factory.mktemp("vqa")
    train = generate_vqa(root / "train", n_images=300, questions_per_image=3, size=32, seed=1, progress=False)
    generate_vqa(root / "test", n_images=60, questions_per_image=3, size=32, seed=2, progress=False)
    write_shards(root / "train" / "manifest.jsonl", root / "shards_train", shard_size=300, progress=False)
    write_shards(root / "test" / "manifest.jsonl", root / "shards_test", shard_size=300, progress=False)
    train_tokenizer([q for r in train for q in r["question"].values()], root / "tok", vocab_size=300)
    write_answer_vocab(str(root / "shards_train"), root / "answers.json", progress=False)  # the data step
    return root, train


def test_generator_has_three_languages_ten_answers_and_disagreement(vqa_data):
    _, rows = vqa_data
    assert {lang for r in rows for lang in r["question"]} == {"en", "de", "fr"}
    assert all(len(a) == 10 for r in rows for a in r["answers"].values())
    assert {r["question_type"] for r in rows} == {"color", "shape", "count", "position", "exists"}
    disagree = sum(len(set(a)) > 1 for r in rows for a in r["answers"].values())
    assert 0.3 < disagree / (3 * len(rows)) < 1.0
    assert all(a == normalize_answer(a) for r in rows for a in r["answers"]["en"])  # stored normalised


def test_vqa_head_learns_above_majority_baseline(vqa_data, tmp_path):
    from mlmm.config import load_config
    from mlmm.evaluation.vqa import evaluate_vqa
    from mlmm.hub import from_pretrained
    from mlmm.training import Trainer

    root, _ = vqa_data
    cfg = load_config(REPO / "recipes" / "configs" / "tiny_vqa.yaml", [
        f"data.train_shards={root / 'shards_train'}", f"model.text.tokenizer={root / 'tok'}",
        f"model.heads.vqa.answers_from={root / 'answers.json'}", f"output_dir={tmp_path / 'run'}",
        f"train.ds_config={REPO / 'ds_config.json'}", "train.progress=false", "train.max_steps=300",
        "train.log_every=50"])
    trainer = Trainer(cfg).setup()
    trainer.train()
    export = trainer.export()
    trainer.cleanup()
    model = from_pretrained(export)
    vocab = model.heads["vqa"].answers
    assert "2" in vocab and "rot" in vocab and "oui" in vocab  # built from the training answers, all languages
    records = evaluate_vqa(model, str(root / "shards_test"), progress=False)
    assert {r["language"] for r in records} == {"en", "de", "fr"}
    for r in records:
        m = r["metrics"]
        print(r["language"], {k: round(v, 1) for k, v in m.items()})
        assert m["accuracy"] > m["acc_majority"] + 10, (r["language"], m)
    mean_acc = sum(r["metrics"]["accuracy"] for r in records) / 3
    mean_prior = sum(r["metrics"]["acc_majority_qtype"] for r in records) / 3
    assert mean_acc > mean_prior, (mean_acc, mean_prior)  # it looks at the image, not only the question type


def test_the_answer_vocabulary_is_a_data_step_read_at_config_load(vqa_data, tmp_path, monkeypatch):
    """mlmm-vqa-answers counts the training answers once; the head config reads its file; building the model reads
    no shard (the head used to scan the training shards in its constructor, on every rank)."""
    from collections import Counter

    from mlmm.config import ConfigError, load_config
    from mlmm.data import shards
    from mlmm.data.answers import main as answers_main, read_answer_vocab
    from mlmm.models.model import MultimodalModel
    from mlmm.data.tokenization import load_tokenizer

    root, rows = vqa_data
    counts = Counter(normalize_answer(a) for r in rows for answers in r["answers"].values() for a in answers)
    assert read_answer_vocab(root / "answers.json") == sorted(counts, key=lambda a: (-counts[a], a))
    assert answers_main(["--shards", str(root / "shards_train"), "--out", str(tmp_path / "top3.json"),
                         "--max-answers", "3"]) == 0
    assert read_answer_vocab(tmp_path / "top3.json") == sorted(counts, key=lambda a: (-counts[a], a))[:3]
    base = [f"data.train_shards={root / 'shards_train'}", f"model.text.tokenizer={root / 'tok'}",
            f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match=r"answers_from: .*shards_train is not an answer vocabulary file \(build "
                                          r"one from the training shards: mlmm-vqa-answers --shards SHARDS"):
        load_config(REPO / "recipes" / "configs" / "tiny_vqa.yaml", [*base,
                    f"model.heads.vqa.answers_from={root / 'shards_train'}"])
    cfg = load_config(REPO / "recipes" / "configs" / "tiny_vqa.yaml", [*base,
                      f"model.heads.vqa.answers_from={tmp_path / 'top3.json'}"])
    assert cfg.model.heads["vqa"].answers == read_answer_vocab(tmp_path / "top3.json")

    def no_shards(*args, **kwargs):
        raise AssertionError("a shard was read while building the model")

    monkeypatch.setattr(shards, "iter_samples", no_shards)
    model = MultimodalModel(cfg.model, load_tokenizer(root / "tok"))
    assert model.heads["vqa"].answers == cfg.model.heads["vqa"].answers
