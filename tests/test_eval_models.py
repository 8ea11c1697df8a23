"""Any model behind one interface: `eval/run_suite.py --model <form>` on tiny saved models of every kind gives the
embeddings (and so the figures) of each library's own encode functions, to 1e-5; broken or missing checkpoints are
one-line errors naming the path (issue 21 part 1, issue 18 part 6)."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import eval_zoo  # tests/ is on sys.path under pytest (its default "prepend" import mode)

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    rows = eval_zoo.build_shards(root)
    suite = {"name": "zoo", "tasks": [{"task": "retrieval", "dataset": "shapes", "shards": str(root / "shards"),
                                       "languages": ["en", "de"]}]}
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    return {"root": root, "rows": rows, "run": eval_zoo.mlmm_run(root), "oc": eval_zoo.open_clip_models(root),
            "hf": eval_zoo.transformers_clip(root), "mclip": eval_zoo.mclip_folder(root)}


def suite_results(zoo, model: str, out: Path) -> list[dict]:
    run_suite = _load_cli("run_suite")
    assert run_suite.main(["--model", model, "--config", str(zoo["root"] / "suite.yaml"), "--out", str(out),
                           "--workers", "0"]) == 0
    return json.loads((out / "results.json").read_text())["results"]


def _load_cli(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "eval" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def reference_metrics(zoo, image_emb: torch.Tensor, encode_text) -> dict:
    """The suite's retrieval protocol on embeddings computed with a library's own functions."""
    from mlmm.evaluation.retrieval import bidirectional_retrieval
    from mlmm.evaluation.runner import text_queries

    out = {}
    rows = {i: i for i in range(len(zoo["rows"]))}  # write_shards keeps the manifest's order
    for lang in ("de", "en"):
        caps = [(i, c) for i, r in enumerate(zoo["rows"]) for c in r["captions"][lang]]
        texts, positives = text_queries(caps, rows)
        t = F.normalize(encode_text(texts).float(), dim=-1)
        out[lang] = bidirectional_retrieval(image_emb, t, positives.float().argmax(1), x_name="image",
                                            text_positives=positives)
    return out


def images(zoo):
    from PIL import Image

    return [Image.open(zoo["root"] / "gen" / r["image"]).convert("RGB") for r in zoo["rows"]]


def check(records: list[dict], ref: dict, model_name: str):
    assert {r["language"] for r in records} == {"en", "de"}
    for r in records:
        assert r["model"] == model_name and r["skipped"] == {}
        for k, v in ref[r["language"]].items():
            assert abs(r["metrics"][k] - v) <= ATOL, (r["language"], k, r["metrics"][k], v)


@pytest.mark.parametrize("form", ["arch", "local-dir", "hf-hub"])
def test_open_clip_forms_equal_open_clips_encode_functions(zoo, form, tmp_path, monkeypatch):
    import open_clip
    from hf_cache import offline_hub

    from mlmm.evaluation.models import load_model

    oc = zoo["oc"]
    spec = {"arch": f"open_clip:{eval_zoo.OC_ARCH},pretrained={oc['weights']},config={oc['configs']}",
            "local-dir": f"local-dir:{oc['local']}", "hf-hub": "hf-hub:org/tiny-oc"}[form]
    if form == "hf-hub":  # offline, from a populated HF cache
        offline_hub(monkeypatch, oc["hf_home"])
    name = spec.split(",")[0].removeprefix("open_clip:")
    ref_model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=str(oc["weights"]) if form == "arch" else None)
    ref_model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        img = ref_model.encode_image(torch.stack([preprocess(i) for i in images(zoo)]), normalize=True)
        ref = reference_metrics(zoo, img, lambda t: ref_model.encode_text(tokenizer(t)))
        model = load_model(spec)
        x = torch.stack([model.transform()({"jpg": (zoo["root"] / "gen" / r["image"]).read_bytes()})["image"]
                         for r in zoo["rows"]])
        torch.testing.assert_close(model.encode_image(x), img, rtol=0, atol=ATOL)
    check(suite_results(zoo, spec, tmp_path / "out"), ref, name)


def test_transformers_clip_equals_get_image_and_text_features(zoo, tmp_path):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    folder = zoo["hf"]
    ref_model = CLIPModel.from_pretrained(folder).eval()
    proc, tok = CLIPImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)

    def feats(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        img = F.normalize(feats(ref_model.get_image_features(
            pixel_values=proc(images=images(zoo), return_tensors="pt")["pixel_values"])), dim=-1)
        ref = reference_metrics(zoo, img, lambda t: feats(ref_model.get_text_features(
            **tok(t, padding=True, truncation=True, max_length=32, return_tensors="pt"))))
    for spec in (str(folder), f"transformers:{folder}"):
        check(suite_results(zoo, spec, tmp_path / spec[:4]), ref, str(folder))


def test_mlmm_run_folder_and_export_equal_model_encode(zoo, tmp_path):
    import mlmm

    model = mlmm.from_pretrained(zoo["run"] / "export")
    from mlmm.data.transforms import decode_image, image_to_tensor

    x = torch.stack([image_to_tensor(decode_image((zoo["root"] / "gen" / r["image"]).read_bytes(), 32), 32, False)
                     for r in zoo["rows"]])
    with torch.no_grad():
        ref = reference_metrics(zoo, model.encode("image", x), model.encode_text)
    for spec in (zoo["run"], zoo["run"] / "export", f"mlmm:{zoo['run']}"):
        check(suite_results(zoo, str(spec), tmp_path / str(len(str(spec)))), ref, "mlmm:tiny")


def test_mclip_pair_equals_mean_pooled_projection_and_open_clip_image(zoo, tmp_path):
    import open_clip
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    oc, folder = zoo["oc"], zoo["mclip"]
    spec = f"mclip:{folder},image=local-dir:{oc['local']}"
    ref_img, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{oc['local']}")
    ref_img.eval()
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    enc = AutoModel.from_config(AutoConfig.from_pretrained(folder / "base")).eval()
    enc.load_state_dict({k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")})
    tok = AutoTokenizer.from_pretrained(folder)

    def mclip_text(texts):  # M-CLIP's MultilingualCLIP.forward, written out
        t = tok(texts, padding=True, return_tensors="pt")
        h = enc(**t)[0]
        att = t["attention_mask"]
        pooled = (h * att.unsqueeze(2)).sum(dim=1) / att.sum(dim=1)[:, None]
        return pooled @ sd["LinearTransformation.weight"].T + sd["LinearTransformation.bias"]

    with torch.no_grad():
        img = ref_img.encode_image(torch.stack([preprocess(i) for i in images(zoo)]), normalize=True)
        ref = reference_metrics(zoo, img, mclip_text)
    check(suite_results(zoo, spec, tmp_path / "out"), ref, f"mclip:{folder}+local-dir:{oc['local']}")


def test_mclip_with_an_mlmm_text_export_equals_its_standalone_encoder(zoo, tmp_path):
    import mlmm
    from mlmm.evaluation.models import load_model
    from mlmm.hub import export_transformers_text
    from mlmm.hub.text_encoder import MlmmTextEncoder

    text = export_transformers_text(mlmm.from_pretrained(zoo["run"]), tmp_path / "text")
    model = load_model(f"mclip:{text},image=local-dir:{zoo['oc']['local']}")
    texts = ["a red circle", "ein roter Kreis"]
    torch.testing.assert_close(model.encode_text(texts), MlmmTextEncoder.from_pretrained(text).encode(texts),
                               rtol=0, atol=ATOL)


BROKEN = {
    "missing": (lambda p: None, "no such folder"),
    "no_weights": (lambda p: (p / "export" / "model.safetensors").unlink(), "model.safetensors missing"),
    "truncated": (lambda p: (p / "export" / "model.safetensors").write_bytes(b"\0" * 10), "unreadable safetensors"),
    "no_tokenizer": (lambda p: [f.unlink() for f in (p / "export").glob("tokenizer*")], "tokenizer files missing"),
    "bad_config": (lambda p: (p / "export" / "config.json").write_text("{not json"), "unreadable JSON"),
    "no_export": (lambda p: __import__("shutil").rmtree(p / "export"), "a run folder without export/"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoints_are_one_line_errors_naming_the_path(zoo, case, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    if case != "missing":
        shutil.copytree(zoo["run"], run)
    damage, message = BROKEN[case]
    damage(run)
    for cli, extra in (("run_retrieval", ["--shards", str(zoo["root"] / "shards")]),
                       ("run_zeroshot", ["--shards", str(zoo["root"] / "shards")]),
                       ("run_vqa", ["--shards", str(zoo["root"] / "shards")]),
                       ("run_suite", ["--config", str(zoo["root"] / "suite.yaml")])):
        assert _load_cli(cli).main(["--model", str(run), *extra, "--out", str(tmp_path / cli)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and str(run) in err, (cli, err)
        assert "Traceback" not in err


def test_foreign_models_are_refused_by_mlmm_only_tasks_and_random_weights_are_refused(zoo, tmp_path, capsys):
    from mlmm.evaluation.models import ModelLoadError, load_model

    assert _load_cli("run_vqa").main(["--model", str(zoo["hf"]), "--shards", str(zoo["root"] / "shards")]) == 2
    assert "needs an mlmm model with a vqa head" in capsys.readouterr().err
    with pytest.raises(ModelLoadError, match="without weights .give a pretrained tag or a file"):
        load_model(f"open_clip:{eval_zoo.OC_ARCH},config={zoo['oc']['configs']}")
    assert load_model(f"open_clip:{eval_zoo.OC_ARCH},pretrained=random,config={zoo['oc']['configs']}").pretrained \
        == "random"  # an untrained network only when asked for by name
    import shutil

    from safetensors.torch import load_file, save_file

    empty = tmp_path / "oc_no_weights"
    empty.mkdir()
    shutil.copy(zoo["oc"]["local"] / "open_clip_config.json", empty)
    with pytest.raises(ModelLoadError, match=f"local-dir:{empty}: no open_clip weights in that folder"):
        load_model(f"local-dir:{empty}")
    partial = tmp_path / "hf_partial"
    shutil.copytree(zoo["hf"], partial)
    sd = load_file(str(partial / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if "visual_projection" not in k}, str(partial / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="weights missing from the checkpoint .left random.: .'visual_projection"):
        load_model(str(partial))
    with pytest.raises(ModelLoadError, match="a text encoder only; pair it with an image tower"):
        load_model(str(zoo["mclip"]))
    with pytest.raises(ModelLoadError, match="option 'colour=red' is not one of"):
        load_model(f"{zoo['run']},colour=red")
