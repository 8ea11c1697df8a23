"""Export / reload, model cards, publishing (dry run, token, upload calls) and loading repo ids offline."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlmm.config import ImageTowerConfig, ModelConfig, TextTowerConfig
from mlmm.hub import build_model_card, from_pretrained, save_pretrained, validate_model_card
from mlmm.hub.export import read_config
from mlmm.hub.publish import PublishError, main as publish_main, publish
from mlmm.models.model import MultimodalModel


def image_model():
    torch.manual_seed(0)
    return MultimodalModel(ModelConfig(embed_dim=16, image=ImageTowerConfig()))


def test_round_trip_identical_embeddings(tmp_path):
    model = image_model().eval()
    out = save_pretrained(model, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(from_pretrained(out).encode("image", x), model.encode("image", x), rtol=0, atol=0)


def test_truncated_weights_give_a_clear_error(tmp_path):
    out = save_pretrained(image_model(), tmp_path / "export")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match="unreadable safetensors file"):
        from_pretrained(out)


def test_not_an_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an mlmm export"):
        from_pretrained(tmp_path)


def test_export_of_a_pretrained_text_tower_reloads(tmp_path):
    """A text tower started from a HF folder (e.g. a distilled MiniLM student) reloads from the export alone."""
    from transformers import BertConfig, BertModel

    from mlmm.data.tokenization import train_tokenizer

    tok = train_tokenizer(["a red circle", "ein roter Kreis", "un cercle rouge"] * 5, tmp_path / "tok", vocab_size=60)
    hf = BertModel(BertConfig(vocab_size=len(tok), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=48, max_position_embeddings=40))
    hf.save_pretrained(tmp_path / "hf")
    cfg = ModelConfig(embed_dim=16, text=TextTowerConfig(tokenizer=str(tmp_path / "tok"),
                                                         pretrained=str(tmp_path / "hf")))
    model = MultimodalModel(cfg, tok).eval()
    out = save_pretrained(model, tmp_path / "export")
    import shutil

    shutil.rmtree(tmp_path / "hf")  # the export must not need the original folder
    texts = ["a red circle", "un cercle rouge"]
    torch.testing.assert_close(from_pretrained(out).encode_text(texts), model.encode_text(texts), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ Hub publishing
TEXTS = ["a red circle", "ein roter Kreis", "un cercle rouge"]
RECORDS = [
    {"task": "image-text", "dataset": "generated", "language": lang, "n": 20,
     "metrics": {"t2x_R@1": r1, "x2t_R@1": r1 + 5, "rsum": 3 * r1, "chance_t2x_R@1": 5.0}}
    for lang, r1 in (("en", 40.0), ("de", 30.0), ("vi", 10.0))
] + [{"task": "vqa", "dataset": "scenes", "language": "fr", "n": 9, "metrics": {"accuracy": 66.6}}]
N_EVAL = 3 * 3 + 1  # metrics per record, without the chance baselines
HUB_FILES = ["README.md", "config.json", "model.safetensors", "open_clip_config.json", "open_clip_model.safetensors",
             "text/README.md", "text/config.json", "text/mlmm_text.json", "text/mlmm_text_encoder.py",
             "text/model.safetensors", "text/projection.safetensors", "text/tokenizer.json",
             "text/tokenizer_config.json", "tokenizer.json", "tokenizer_config.json"]


def image_text_model(tmp_path):
    from mlmm.data.tokenization import train_tokenizer

    tok = train_tokenizer([t.lower() for t in TEXTS] * 5, tmp_path / "tok", vocab_size=60)
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=16, image=ImageTowerConfig(), text=TextTowerConfig(tokenizer=str(tmp_path / "tok")))
    return MultimodalModel(cfg, tok).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as the trainer + eval suite leave it: run/export/ + run/results.json."""
    root = tmp_path_factory.mktemp("run")
    model = image_text_model(root)
    save_pretrained(model, root / "run" / "export")
    (root / "run" / "results.json").write_text(json.dumps({"results": RECORDS}), encoding="utf-8")
    return root / "run", model


def test_model_card_metadata_validates_offline(run_dir):
    run, _ = run_dir
    config = read_config(run / "export")
    text = build_model_card(config, RECORDS, repo_id="org/tiny", license="mit", datasets=["org/shapes"],
                            formats=("open_clip",))
    card = validate_model_card(text, require=("license", "language"), n_eval_results=N_EVAL)
    assert card.data.license == "mit" and card.data.language == ["en", "de", "vi", "fr"]
    assert card.data.library_name == "mlmm" and card.data.datasets == ["org/shapes"] and "open_clip" in card.data.tags
    by_lang = {(r.dataset_config, r.metric_type): r for r in card.data.eval_results}
    assert by_lang[("de", "t2x_R@1")].metric_value == 30.0 and by_lang[("de", "t2x_R@1")].task_type == \
        "image-text-retrieval"
    assert by_lang[("fr", "accuracy")].task_type == "visual-question-answering"
    assert not any(r.metric_type.startswith("chance") for r in card.data.eval_results)
    assert "hf-hub:org/tiny" in text and "| de | 30.00 | 35.00 | 90.00 | 20 |" in text
    with pytest.raises(ValueError, match="license is not set"):
        validate_model_card(build_model_card(config, RECORDS), require=("license",))
    with pytest.raises(ValueError, match="'english' is not an ISO 639 code"):
        validate_model_card(text.replace("- vi\n", "- english\n", 1))
    with pytest.raises(ValueError, match="metadata does not parse"):
        validate_model_card(text.replace("      type: image-text-retrieval\n", "", 1))
    with pytest.raises(ValueError, match="no YAML metadata block"):
        validate_model_card("# just a title\n")
    with pytest.raises(ValueError, match="model-index has 10 results, expected 3"):
        validate_model_card(text, n_eval_results=3)


def test_dry_run_builds_and_validates_the_hub_folder(run_dir, tmp_path, capsys):
    run, model = run_dir
    out = tmp_path / "hub"
    assert publish_main(["--checkpoint", str(run), "--repo-id", "org/tiny", "--dry-run", "--out", str(out),
                         "--datasets", "org/shapes", "--license", "cc-by-4.0"]) == 0
    printed = capsys.readouterr().out
    assert "built (dry run)" in printed and "formats: mlmm, transformers, open_clip; 10 eval results" in printed
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted(HUB_FILES + [".mlmm_hub"])
    card = validate_model_card((out / "README.md").read_text(encoding="utf-8"), n_eval_results=N_EVAL)
    assert card.data.license == "cc-by-4.0" and card.data.datasets == ["org/shapes"]  # results.json found in RUN/
    oc = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    assert oc["text_cfg"]["hf_model_name"] == oc["text_cfg"]["hf_tokenizer_name"] == "org/tiny"
    merged = json.loads((out / "config.json").read_text())
    assert merged["model_type"] == "bert" and merged["hidden_size"] == 32 and merged["mlmm_format"] == 1
    torch.testing.assert_close(from_pretrained(out).encode_text(TEXTS), model.encode_text(TEXTS), rtol=0, atol=0)
    # rebuilding into the same folder is fine; a foreign non-empty folder is refused
    assert publish(run, "org/tiny", dry_run=True, out_dir=out)["formats"] == ["transformers", "open_clip"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(PublishError, match="not built by mlmm.hub.publish"):
        publish(run, "org/tiny", dry_run=True, out_dir=tmp_path / "mine")
    with pytest.raises(PublishError, match="expected 'org/name'"):
        publish(run, "no-org", dry_run=True, out_dir=tmp_path / "x")
    with pytest.raises(PublishError, match="is an mlmm export"):
        publish(tmp_path, "org/tiny", dry_run=True)


def test_image_only_model_publishes_without_interop_files(tmp_path):
    save_pretrained(image_model().eval(), tmp_path / "export")
    summary = publish(tmp_path / "export", "org/img", dry_run=True, out_dir=tmp_path / "hub")
    assert summary["formats"] == [] and summary["files"] == ["README.md", "config.json", "model.safetensors"]


def test_publish_needs_a_token_and_uploads_with_create_repo_and_upload_folder(run_dir, tmp_path, monkeypatch,
                                                                               capsys):
    import huggingface_hub
    from huggingface_hub import constants

    run, _ = run_dir
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(PublishError, match="no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        publish(run, "org/tiny")
    assert publish_main(["--checkpoint", str(run), "--repo-id", "org/tiny"]) == 2
    assert "error: no Hugging Face token" in capsys.readouterr().out

    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        calls.append(("upload_folder", repo_id, {**kw, "files": files, "token": self.token}))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    summary = publish(run, "org/tiny", private=True)
    assert summary["url"] == "https://huggingface.co/org/tiny" and not Path(summary["folder"]).exists()  # temp
    (_, repo, kw1), (_, repo2, kw2) = calls
    assert repo == repo2 == "org/tiny" and kw1["private"] is True and kw1["exist_ok"] is True
    assert kw2["files"] == sorted(HUB_FILES + [".mlmm_hub"]) and kw2["ignore_patterns"] == [".mlmm_hub"]
    assert kw2["token"] == "hf_test_token" and kw2["repo_type"] == "model"


OFFLINE_SCRIPT = r"""
import json, re, sys
import torch, open_clip, mlmm
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer

texts, x = json.loads(sys.argv[1]), load_file(sys.argv[2])["x"]
out = {"mlmm_text": mlmm.from_pretrained("org/tiny").encode_text(texts),
       "mlmm_image": mlmm.from_pretrained("org/tiny").encode("image", x)}
oc, _, _ = open_clip.create_model_and_transforms("hf-hub:org/tiny")
tok = open_clip.get_tokenizer("hf-hub:org/tiny")
out["oc_text"], out["oc_image"] = oc.eval().encode_text(tok(texts), normalize=True), oc.encode_image(x, normalize=True)
enc = AutoModel.from_pretrained("org/tiny", subfolder="text")
t = AutoTokenizer.from_pretrained("org/tiny", subfolder="text")
W = load_file(hf_hub_download("org/tiny", "projection.safetensors", subfolder="text"))["weight"]
b = t(texts, padding=True, return_tensors="pt")
h = enc(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
m = b["attention_mask"].unsqueeze(-1).float()
out["tf_text"] = torch.nn.functional.normalize(((h * m).sum(1) / m.sum(1)) @ W.T, dim=-1)
# the model card's open_clip snippet, as is
card = open(hf_hub_download("org/tiny", "README.md"), encoding="utf-8").read()
snippet = next(b for b in re.findall(r"```python\n(.*?)```", card, re.S) if "import open_clip" in b)
ns = {}
exec(snippet, ns)
out["card_oc_text"] = ns["z_text"]
save_file({k: v.detach().contiguous() for k, v in out.items()}, sys.argv[3])
try:
    mlmm.from_pretrained("org/not-cached")
except FileNotFoundError as e:
    print("ERROR:", e)
"""


def test_repo_id_loads_offline_from_the_hf_cache(run_dir, tmp_path):
    """HF_HUB_OFFLINE=1 + a populated HF cache: mlmm, open_clip (hf-hub:) and transformers (subfolder="text")
    load the published folder by repo id and reproduce mlmm's embeddings; an uncached repo gives a clear error."""
    from safetensors.torch import load_file, save_file

    run, model = run_dir
    folder = publish(run, "org/tiny", dry_run=True, out_dir=tmp_path / "hub")["folder"]
    cache, commit = tmp_path / "cache", "a" * 40  # huggingface_hub's cache layout: refs/main -> snapshots/<commit>
    shutil.copytree(folder, cache / "models--org--tiny" / "snapshots" / commit)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text(commit)
    x = torch.randn(2, 3, 32, 32)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, json.dumps(TEXTS), str(tmp_path / "x.safetensors"),
                           str(tmp_path / "out.safetensors")], env=env, capture_output=True, text=True, timeout=300,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "out.safetensors"))
    for k in ("mlmm_text", "oc_text", "tf_text"):
        torch.testing.assert_close(got[k], model.encode_text(TEXTS), rtol=0, atol=1e-5, msg=k)
    # the card's snippet (model.eval() included: the tiny BERT tower has dropout 0.1)
    torch.testing.assert_close(got["card_oc_text"], model.encode_text(["a red circle"]), rtol=0, atol=1e-5)
    for k in ("mlmm_image", "oc_image"):
        torch.testing.assert_close(got[k], model.encode("image", x), rtol=0, atol=1e-5, msg=k)
    assert "ERROR: org/not-cached: not a local folder, and the Hub repo could not be fetched" in proc.stdout
    assert "HF_HUB_OFFLINE is set: only the local cache" in proc.stdout


def test_local_paths_and_repo_ids_are_told_apart(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder, and not a Hugging Face Hub repo id"):
        from_pretrained(str(tmp_path / "missing" / "export"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="an mlmm export is a folder"):
        from_pretrained(tmp_path / "file.txt")


def test_card_base_model_from_a_hub_text_tower(run_dir):
    run, _ = run_dir
    config = {**read_config(run / "export"), "text_base_model": "sentence-transformers/all-MiniLM-L6-v2"}
    card = validate_model_card(build_model_card(config, license="apache-2.0"), require=("license",))
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2" and card.data.eval_results is None


def test_native_text_tower_exports_reloads_and_says_why_there_is_no_interop(tmp_path, caplog):
    """arch: clip round-trips through mlmm's format; open_clip / transformers exports are refused with the reason."""
    import logging

    from mlmm.data.tokenization import train_tokenizer
    from mlmm.hub.interop_open_clip import open_clip_problems
    from mlmm.hub.interop_transformers import export_transformers_text

    tok = train_tokenizer([t.lower() for t in TEXTS] * 5, tmp_path / "tok", vocab_size=60)
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=16, image=ImageTowerConfig(),
                      text=TextTowerConfig(tokenizer=str(tmp_path / "tok"), arch="clip", hidden=32, heads=4))
    model = MultimodalModel(cfg, tok).eval()
    out = save_pretrained(model, tmp_path / "export")
    again = from_pretrained(out)
    assert type(again.towers["text"]).__name__ == "NativeTextTower"
    torch.testing.assert_close(again.encode_text(TEXTS), model.encode_text(TEXTS), rtol=0, atol=0)
    assert "native tower" in open_clip_problems(model)[0]
    with pytest.raises(ValueError, match="native tower"):
        export_transformers_text(model, tmp_path / "text")
    with caplog.at_level(logging.INFO):
        summary = publish(out, "org/native", dry_run=True, out_dir=tmp_path / "hub", languages=["en", "de", "fr"])
    assert summary["formats"] == [] and "native tower" in caplog.text
