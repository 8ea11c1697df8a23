"""Pretrained towers, tokenizers and teachers by Hub id, offline from a Hugging Face cache holding random stand-ins of
the real classes (XLMRobertaModel, BertModel, open_clip CLIP) saved in their real formats (tests/hf_cache.py)."""
from pathlib import Path

import pytest
import torch
from hf_cache import TINY_OPEN_CLIP, offline_hub, put_in_hf_cache, save_bert, save_open_clip, save_xlmr

from mlmm.config import build_config
from mlmm.sources import HubId, parse_source

TEXTS = ["a red circle on a blue square", "ein roter Kreis auf einem blauen Quadrat", "un cercle rouge",
         "a dog runs on the beach", "ein Hund rennt am Strand", "un chien court sur la plage"] * 4


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """Saved stand-ins (not yet in any cache): XLM-R, BERT and a tiny open_clip model."""
    root = tmp_path_factory.mktemp("standins")
    xlmr = save_xlmr(root / "xlmr", TEXTS)
    bert = save_bert(root / "bert", TEXTS, seed=1)
    clip = save_open_clip(root / "clip", TINY_OPEN_CLIP, seed=2)
    return root, xlmr, bert, clip


@pytest.fixture
def hub(standins, tmp_path, monkeypatch):
    """An offline HF cache with the stand-ins under Hub ids (one of them also at a second revision)."""
    root = standins[0]
    cache = offline_hub(monkeypatch, tmp_path / "hf_home")
    put_in_hf_cache(cache, "FacebookAI/xlm-roberta-base", root / "xlmr")
    put_in_hf_cache(cache, "tiny-bert", root / "bert")  # a legacy id without an org, like xlm-roberta-base
    put_in_hf_cache(cache, "test-org/bert", root / "bert", revision="v1")
    put_in_hf_cache(cache, "test-org/tiny-clip", root / "clip")
    return cache


def text_run_config(text: dict, **model):
    """A contrastive run config around text tower `text` (and a default tiny image tower unless `model` names one:
    the contrastive loss needs a second tower)."""
    model = {"image": {}, **model}
    return build_config({"model": {"embed_dim": 32, "text": text, **model}, "loss": {"name": "contrastive"}})


# ------------------------------------------------------------------------------------------------ id vs path
def test_sources_tell_local_paths_from_hub_ids(tmp_path, monkeypatch):
    assert parse_source("FacebookAI/xlm-roberta-base") == HubId("FacebookAI/xlm-roberta-base")
    assert parse_source("xlm-roberta-base") == HubId("xlm-roberta-base")
    assert parse_source("org/name@v1.0") == HubId("org/name", "v1.0")
    assert parse_source("org/name@refs/pr/1") == HubId("org/name", "refs/pr/1")
    for path in ("/abs/tok", "./tok", "../tok", "~/tok", "a/b/c", "runs/x@", "bad name/x"):
        assert isinstance(parse_source(path), Path), path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)  # an existing folder wins over the id reading
    assert parse_source("org/name") == Path("org/name")
    assert str(HubId("org/name", "v1")) == "org/name@v1"
    assert HubId("org/name", "v1").fetch_command() == "hf download org/name --revision v1"


# ------------------------------------------------------------------------------------------------ HF towers
def test_text_towers_and_tokenizers_load_by_hub_id_offline(standins, hub):
    """model.text.pretrained / tokenizer as org/name, a bare name and org/name@revision: the real classes, the saved
    weights exactly, the saved tokenizer's ids; nothing but the cache is read (HF_HUB_OFFLINE=1)."""
    from transformers import BertModel, XLMRobertaModel

    from mlmm.models.model import MultimodalModel
    from mlmm.training.trainer import load_tokenizer

    _, (xlmr, xtok), (bert, btok), _ = standins
    for text_id, saved, tok, cls in [("FacebookAI/xlm-roberta-base", xlmr, xtok, XLMRobertaModel),
                                     ("tiny-bert", bert, btok, BertModel), ("test-org/bert@v1", bert, btok, BertModel)]:
        cfg = text_run_config({"pretrained": text_id, "max_length": 32})  # tokenizer: the model's
        tokenizer = load_tokenizer(cfg)
        assert type(tokenizer).__name__ == type(tok).__name__
        assert tokenizer(TEXTS[:2])["input_ids"] == tok(TEXTS[:2])["input_ids"]
        model = MultimodalModel(cfg.model, tokenizer)
        enc = model.towers["text"].model
        assert type(enc) is cls
        own = enc.state_dict()
        for k, v in saved.state_dict().items():
            if not k.startswith("pooler."):
                assert torch.equal(own[k], v), (text_id, k)
        ids = tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
        with torch.no_grad():
            ref = saved.eval()(**ids).last_hidden_state
            got = model.eval().towers["text"].forward_tokens(ids["input_ids"], ids["attention_mask"])
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_uncached_hub_ids_fail_in_one_line_with_the_fetch_command(hub, tmp_path):
    from mlmm.models.model import MultimodalModel
    from mlmm.training.trainer import load_tokenizer

    with pytest.raises(FileNotFoundError) as e:
        load_tokenizer(text_run_config({"tokenizer": "org/not-cached"}))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.text.tokenizer: org/not-cached is not in the Hugging Face cache")
    assert msg.endswith("fetch it once with: hf download org/not-cached")
    cfg = text_run_config({"tokenizer": str(hub.parent), "pretrained": "FacebookAI/xlm-roberta-base@v2"})
    with pytest.raises(FileNotFoundError, match=r"^model\.text\.pretrained: FacebookAI/xlm-roberta-base@v2 is not in .*"
                                                r"hf download FacebookAI/xlm-roberta-base --revision v2$"):
        MultimodalModel(cfg.model, load_tokenizer(text_run_config({"pretrained": "tiny-bert"})))
    with pytest.raises(FileNotFoundError, match=r"^model\.text\.tokenizer: .*missing-tok: no such file or folder"):
        load_tokenizer(text_run_config({"tokenizer": str(tmp_path / "missing-tok")}))


# ------------------------------------------------------------------------------------------------ open_clip
def test_open_clip_image_tower_and_teacher_by_hub_id_offline(standins, hub, tmp_path):
    """model.image.pretrained / train.init_from / a teacher as hf-hub:org/name (open_clip's own HF-cache download):
    the saved weights exactly; the mlmm image tower embeds like open_clip; uncached ids and tags fail in one line."""
    import open_clip

    from mlmm.distill.teacher import TeacherConfig, build_teacher
    from mlmm.models.model import MultimodalModel
    from mlmm.training.finetune import load_init
    from mlmm.training.trainer import load_tokenizer

    clip = standins[3].eval()
    image = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2}
    text = {"pretrained": "tiny-bert"}
    cfg = text_run_config(text, image={**image, "pretrained": "hf-hub:test-org/tiny-clip"})
    model = MultimodalModel(cfg.model, load_tokenizer(cfg)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode("image", x), clip.encode_image(x, normalize=True), rtol=0, atol=1e-5)
    fresh = MultimodalModel(text_run_config(text, image=image).model, load_tokenizer(cfg))
    load_init(fresh, "hf-hub:test-org/tiny-clip")  # train.init_from by Hub id: the same weights
    for k, v in model.state_dict().items():
        if k.startswith(("towers.image.", "proj.image.")):
            assert torch.equal(fresh.state_dict()[k], v), k

    teacher = build_teacher(TeacherConfig(arch="hf-hub:test-org/tiny-clip"), cache=False)
    for k, v in clip.state_dict().items():
        assert torch.equal(teacher.model.state_dict()[k], v), k
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=16)  # the stand-in reads open_clip's BPE, 16 tokens
    with torch.no_grad():
        torch.testing.assert_close(teacher.encode_text(TEXTS[:2]), clip.encode_text(tok(TEXTS[:2]), normalize=True))

    with pytest.raises(FileNotFoundError) as e:
        MultimodalModel(text_run_config(text, image={**image, "pretrained": "hf-hub:test-org/missing"}).model,
                        load_tokenizer(cfg))
    assert "\n" not in str(e.value) and str(e.value).startswith("model.image.pretrained: open_clip model "
                                                                "hf-hub:test-org/missing is not in the Hugging Face")
    assert str(e.value).endswith("hf download test-org/missing --include 'open_clip_*'")
    with pytest.raises(FileNotFoundError, match=r"^loss\.teacher: open_clip ViT-B-32 weights 'laion2b_s34b_b79k' is "
                                                r"not in .*hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K "
                                                r"--include 'open_clip_\*'$"):
        build_teacher(TeacherConfig(arch="ViT-B-32", pretrained="laion2b_s34b_b79k"), cache=False)


def _renormalised(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Images normalised with CLIP's mean/std (mlmm's transforms) -> normalised with ``mean`` / ``std``."""
    import open_clip

    m0, s0 = (torch.tensor(v).view(3, 1, 1) for v in (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD))
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return (x * s0 + m0 - m) / s


def test_open_clip_teacher_gets_its_own_preprocessing_and_activation(hub, tmp_path, monkeypatch, caplog):
    """A teacher whose weights were trained on other image statistics (SigLIP-style mean = std = 0.5) sees mlmm's
    CLIP-normalised images re-normalised to them; a pretrained TAG is built through open_clip's tag path with the
    tag's QuickGELU forced (from the bare weights file, open_clip would use plain GELU and CLIP statistics, and from
    the tag alone it would only warn about the activation: a silently different teacher). An image tower
    initialised from such weights warns."""
    import json

    import open_clip
    from open_clip import pretrained as oc_pretrained

    from mlmm.distill.teacher import TeacherConfig, build_teacher
    from mlmm.hub.pretrained import init_image_tower
    from mlmm.models.model import MultimodalModel
    from mlmm.training.trainer import load_tokenizer

    half = [0.5, 0.5, 0.5]
    clip = save_open_clip(tmp_path / "half", mean=half, std=half, seed=3).eval()
    put_in_hf_cache(hub, "test-org/tiny-clip-half", tmp_path / "half")
    x = torch.randn(2, 3, 32, 32)
    teacher = build_teacher(TeacherConfig(arch="hf-hub:test-org/tiny-clip-half"), cache=False)
    with torch.no_grad():
        want = clip.encode_image(_renormalised(x, half, half), normalize=True)
        torch.testing.assert_close(teacher.encode_image(x), want, rtol=0, atol=1e-5)
        assert (teacher.encode_image(x) - clip.encode_image(x, normalize=True)).abs().max() > 1e-2

    # a pretrained tag of a registered architecture, whose pretrained config asks for QuickGELU and 0.5 statistics
    (tmp_path / "tiny-tagged.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(tmp_path / "tiny-tagged.json")
    monkeypatch.setitem(oc_pretrained._PRETRAINED, "tiny-tagged", {"halftag": oc_pretrained._pcfg(
        hf_hub="test-org/tiny-clip-half/open_clip_model.safetensors", quick_gelu=True, mean=half, std=half)})
    # open_clip's own reading of the tag (it only warns about QuickGELU unless forced)
    reference = open_clip.create_model("tiny-tagged", pretrained="halftag", force_quick_gelu=True).eval()
    assert isinstance(reference.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    teacher = build_teacher(TeacherConfig(arch="tiny-tagged", pretrained="halftag"), cache=False)
    assert isinstance(teacher.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    with torch.no_grad():
        want = reference.encode_image(_renormalised(x, half, half), normalize=True)
        torch.testing.assert_close(teacher.encode_image(x), want, rtol=0, atol=1e-5)

    image = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2}
    cfg = text_run_config({"pretrained": "tiny-bert"}, image=image)
    for source in ("hf-hub:test-org/tiny-clip-half", "tiny-tagged:halftag"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="mlmm"):
            init_image_tower(MultimodalModel(cfg.model, load_tokenizer(cfg)), source)
        assert "normalised with mean [0.5, 0.5, 0.5]" in caplog.text, source
    assert "QuickGELU" in caplog.text  # the tag's activation reaches the check too


# ------------------------------------------------------------------------------------------------ fail closed
CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"


@pytest.mark.parametrize("recipe", ["tiny_distill_text", "tiny_distill_audio", "tiny_mla_stage1", "tiny_mla_stage2"])
def test_teacherless_distillation_is_refused_at_config_load(recipe, tmp_path):
    """Without loss.teacher.random_init (which the tiny recipes set), a teacher without weights is one config error."""
    from mlmm.config import ConfigError, load_config

    base = [f"train.init_from={tmp_path}"] + ([] if "audio" in recipe else [f"model.text.tokenizer={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / f"{recipe}.yaml", [*base, "loss.teacher.random_init=false"])
    msg = str(e.value)
    assert "\n" not in msg and ": loss.teacher.checkpoint / loss.teacher.pretrained: the tiny-clip teacher has no " \
                               "weights" in msg and "random_init: true" in msg
    with pytest.raises(ConfigError, match=r"^loss\.terms\.kd\.teacher\.checkpoint / loss\.terms\.kd\.teacher\."
                                          r"pretrained: the ViT-B-32 teacher has no weights"):
        build_config({"model": {"embed_dim": 32, "text": {"tokenizer": "x"}, "image": {}},
                      "loss": {"name": "multi",
                               "terms": {"kd": {"name": "logit_kd", "teacher": {"arch": "ViT-B-32"}}}}})
    with pytest.raises(ConfigError, match=r"loss\.teacher\.checkpoint: /no/such/teacher\.safetensors not found"):
        load_config(CONFIGS / f"{recipe}.yaml", [*base, "loss.teacher.checkpoint=/no/such/teacher.safetensors"])


def test_random_teacher_warns_on_every_run_and_mla_stage2_needs_init_from(tmp_path, caplog, capsys):
    import importlib.util
    import logging

    from mlmm.config import ConfigError, load_config
    from mlmm.distill.teacher import build_teacher
    from mlmm.distill.tiny import write_tiny_open_clip

    tiny = write_tiny_open_clip(tmp_path / "t")
    cfg = load_config(CONFIGS / "tiny_distill_text.yaml", [f"loss.teacher.model_config={tiny['model_config']}",
                                                            f"model.text.tokenizer={tmp_path}"])
    assert cfg.loss.teacher.random_init and cfg.loss.teacher.checkpoint is None
    with caplog.at_level(logging.WARNING, logger="mlmm"):
        teachers = [build_teacher(cfg.loss.teacher) for _ in range(2)]  # the second one comes from the cache
    assert teachers[0] is teachers[1] and teachers[0].random_init
    assert sum("RANDOMLY initialised" in r.getMessage() for r in caplog.records) == 2
    assert teachers[0].identity()["random_init"] is True

    overrides = [f"loss.teacher.model_config={tiny['model_config']}", f"loss.teacher.checkpoint={tiny['checkpoint']}",
                 f"model.text.tokenizer={tmp_path}"]
    with pytest.raises(ConfigError, match=r"^.*tiny_mla_stage2\.yaml: train\.init_from: MLA stage 2 trains language "
                                          r"adapters on the frozen stage-1 student; set train\.init_from"):
        load_config(CONFIGS / "tiny_mla_stage2.yaml", overrides)
    assert load_config(CONFIGS / "tiny_mla_stage2.yaml", [*overrides, "loss.allow_no_init=true"]).loss.allow_no_init
    spec = importlib.util.spec_from_file_location("train_cli", CONFIGS.parents[1] / "recipes" / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--config", str(CONFIGS / "tiny_mla_stage2.yaml"), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("config error: ") and "train.init_from: MLA stage 2" in err


# ------------------------------------------------------------------------------------------------ ZeRO-3
ZERO3_WORKER = """
import sys
import torch
from safetensors.torch import save_file
from mlmm.config import load_config
from mlmm.training import Trainer
from mlmm.training.engine import full_state_dict

config, out, *overrides = sys.argv[1:]
trainer = Trainer(load_config(config, overrides)).setup()
assert trainer.engine.zero_optimization_stage() == 3 and trainer.world == 2 and trainer.step == 0
assert all(p.ds_numel > p.numel() for p in trainer.model.towers["text"].parameters() if p.ds_numel > 1)  # partitioned
sd = full_state_dict(trainer.engine, trainer.model)  # collective: every rank gathers
# the training forward (engine -> model -> loss) on a first batch, before any step: the model's outputs, as ZeRO-3
# computes them from the partitions it gathers module by module
batch = next(iter(trainer.loader)).to(trainer.device, trainer.dtype).normalize_images(trainer.dtype)
outs = {}
hook = trainer.model.register_forward_hook(lambda m, i, o: outs.update({k: v.detach().clone() for k, v in o.items()}))
trainer.engine.eval()
with torch.no_grad():
    trainer.engine(batch)
hook.remove()
with torch.no_grad():  # and outside the engine (evaluation code calls the model's methods)
    model = trainer.model.eval()
    outs["encode_image"] = model.encode("image", batch.image)
    outs["encode_text"] = model.encode("text", batch.text_ids, batch.text_attention)
fields = ("image", "image_mask", "video", "video_mask", "audio", "audio_mask", "text_ids", "text_attention",
          "text_mask")
if trainer.rank == 0:
    save_file({**{f"sd.{k}": v.contiguous() for k, v in sd.items()}, **{f"z.{k}": v for k, v in outs.items()},
               **{f"batch.{f}": getattr(batch, f) for f in fields if getattr(batch, f) is not None}}, out)
trainer.cleanup(destroy_process_group=True)
"""


def test_zero3_holds_the_pretrained_weights_at_step_0(standins, hub, tmp_path):
    """2 gloo processes, ZeRO-3, text tower + tokenizer and image tower by Hub id from the cache: before the first
    step the gathered parameters equal the single-process model's exactly (the pretrained ones the saved stand-ins'),
    and so do the embeddings of the training forward. mlmm loads before partitioning: every rank builds the full
    model, from_pretrained / open_clip fill it, then deepspeed.initialize partitions it (rank 0's values broadcast)."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import build_tiny_data
    from safetensors.torch import load_file

    from mlmm.data.batch import Batch

    from mlmm.config import load_config
    from mlmm.models.model import MultimodalModel
    from mlmm.training.rng import seed_all
    from mlmm.training.trainer import load_tokenizer

    repo = CONFIGS.parents[1]
    data = build_tiny_data(tmp_path / "data", n_images=8, n_videos=2, n_audio=4, shard_size=8, seed=3, vocab_size=60)
    overrides = [f"data.train_shards={data / 'shards'}", "data.batch_size=4", f"output_dir={tmp_path / 'run'}",
                 f"train.ds_config={repo / 'ds_config.json'}", "train.zero_stage=3", "train.progress=false",
                 "model.text.pretrained=FacebookAI/xlm-roberta-base", "model.text.tokenizer=''",
                 "model.image.pretrained=hf-hub:test-org/tiny-clip"]
    config = repo / "recipes" / "configs" / "tiny_clip.yaml"
    (tmp_path / "worker.py").write_text(ZERO3_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(MLMM_CPU_SHM_ALLREDUCE="0", OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(tmp_path / "worker.py"), str(config), str(tmp_path / "out.safetensors"), *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[res.stderr.find("Traceback"):][:4000]
    got = load_file(str(tmp_path / "out.safetensors"))

    cfg = load_config(config, overrides)  # the same model in this process, without DeepSpeed
    seed_all(cfg.seed)  # as Trainer.setup before it builds the model
    ref = MultimodalModel(cfg.model, load_tokenizer(cfg)).eval()
    own = ref.state_dict()
    assert {k[3:] for k in got if k.startswith("sd.")} == set(own)
    for k, v in own.items():
        assert torch.equal(got[f"sd.{k}"], v), k
    (xlmr, _), clip = standins[1], standins[3]
    for k, v in xlmr.state_dict().items():
        if not k.startswith("pooler."):
            assert torch.equal(got[f"sd.towers.text.model.{k}"], v), k
    for k, v in clip.state_dict().items():
        if k.startswith("visual.") and k != "visual.proj":
            assert torch.equal(got[f"sd.towers.image.{k[len('visual.'):]}"], v), k
    fields = {k[len("batch."):]: v for k, v in got.items() if k.startswith("batch.")}
    batch = Batch(keys=[str(i) for i in range(len(fields["text_mask"]))], **fields)
    assert {"image", "text"} <= {m for m in ("image", "video", "audio", "text") if bool(batch.mask(m).any())}
    with torch.no_grad():
        want = ref(batch)
        want["encode_image"] = ref.encode("image", batch.image)
        want["encode_text"] = ref.encode("text", batch.text_ids, batch.text_attention)
    for m in ("image", "video", "audio", "text", "encode_image", "encode_text"):
        torch.testing.assert_close(got[f"z.{m}"], want[m], rtol=0, atol=1e-6, msg=m)
