"""A Hugging Face Hub cache on disk, filled with random stand-ins of real models saved in their real formats.

    cache = offline_hub(monkeypatch, tmp / "hf_home")      # HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE=1, this process
    save_xlmr(tmp / "x", texts)                            # XLMRobertaModel + XLMRobertaTokenizer (save_pretrained)
    put_in_hf_cache(cache, "FacebookAI/xlm-roberta-base", tmp / "x")
    AutoModel.from_pretrained("FacebookAI/xlm-roberta-base")   # now resolves offline from the cache

The layout is huggingface_hub's (``models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> blob,
refs/<revision>}``), written with huggingface_hub's own helpers; ``scan_cache_dir`` reads it back.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

SPECIAL_XLMR = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R ids 0..4 (pad = 1)
SPECIAL_BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def offline_hub(monkeypatch, home: Path) -> Path:
    """Point this process (and its subprocesses, via the environment) at ``home/hub`` with HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants

    cache = Path(home) / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    for k, v in {"HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def put_in_hf_cache(cache: Path, repo_id: str, folder: Path, revision: str = "main",
                    commit: Optional[str] = None, move: bool = False, link: bool = False) -> Path:
    """Store every file of ``folder`` as revision ``revision`` of model ``repo_id``; -> the snapshot folder.

    Large stand-ins: ``move`` moves the files into the cache's blobs, ``link`` hard-links them (keeps ``folder``)
    instead of copying."""
    from huggingface_hub.file_download import (_cache_commit_hash_for_specific_revision, _create_symlink,
                                               _get_pointer_path, repo_folder_name)

    storage = Path(cache) / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
        blob = storage / "blobs" / digest.hexdigest()
        if not blob.exists():
            if link:
                try:
                    os.link(f, blob)
                except OSError:  # another file system
                    shutil.copyfile(f, blob)
            else:
                (shutil.move if move else shutil.copyfile)(str(f), str(blob))
        pointer = _get_pointer_path(str(storage), commit, f.relative_to(folder).as_posix())
        os.makedirs(os.path.dirname(pointer), exist_ok=True)
        _create_symlink(str(blob), pointer, new_blob=False)
    _cache_commit_hash_for_specific_revision(str(storage), revision, commit)
    return storage / "snapshots" / commit


def _train_tokenizer(texts: Sequence[str], specials: list[str], vocab_size: int, unigram: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if unigram:  # XLM-R: sentencepiece-style unigram over Metaspace
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                          show_progress=False)
        bos, eos = "<s>", "</s>"
    else:  # BERT: lowercase WordPiece
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
        bos, eos = "[CLS]", "[SEP]"
    tok.train_from_iterator(list(texts), trainer=trainer)
    assert [tok.token_to_id(t) for t in specials] == list(range(len(specials)))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B:1 {eos}:1",
        special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))])
    return tok


def save_xlmr(out: Path, texts: Sequence[str], *, hidden: int = 32, layers: int = 2, heads: int = 2,
              intermediate: int = 64, vocab_size: Optional[int] = None, max_positions: int = 66, seed: int = 0):
    """A random ``XLMRobertaModel`` + ``XLMRobertaTokenizer`` (unigram, XLM-R special ids) saved with save_pretrained.

    ``vocab_size`` default = the tokenizer's; xlm-roberta-base is hidden 768, 12 layers, 12 heads, 3072,
    vocab 250002, 514 positions. -> (model, tokenizer)."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizer

    tok = XLMRobertaTokenizer(tokenizer_object=_train_tokenizer(texts, SPECIAL_XLMR, 400, unigram=True),
                              bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                              mask_token="<mask>", cls_token="<s>", sep_token="</s>", model_max_length=512)
    torch.manual_seed(seed)
    config = XLMRobertaConfig(vocab_size=vocab_size or len(tok), hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, intermediate_size=intermediate,
                              max_position_embeddings=max_positions, type_vocab_size=1, pad_token_id=1,
                              bos_token_id=0, eos_token_id=2)
    model = XLMRobertaModel(config)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return model, tok


def save_bert(out: Path, texts: Sequence[str], *, hidden: int = 32, layers: int = 2, heads: int = 2,
              intermediate: int = 64, seed: int = 0):
    """A random ``BertModel`` + ``BertTokenizer`` (WordPiece) saved with save_pretrained; -> (model, tokenizer)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    tok = BertTokenizer(tokenizer_object=_train_tokenizer(texts, SPECIAL_BERT, 300, unigram=False),
                        unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                        mask_token="[MASK]", model_max_length=512)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate, max_position_embeddings=64, pad_token_id=0)
    model = BertModel(config)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return model, tok


TINY_OPEN_CLIP = {  # an open_clip model config (embed 32, 32-px ViT, 1-layer text), the format of Hub repos
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_open_clip(out: Path, model_cfg: Optional[dict] = None, arch: Optional[str] = None, seed: int = 0,
                   mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
    """A random open_clip model saved as a Hub repo holds it: ``open_clip_model.safetensors`` +
    ``open_clip_config.json`` ({"model_cfg", "preprocess_cfg"}). ``arch``: a built-in config (e.g. ViT-B-32)
    instead of ``model_cfg``; ``mean`` / ``std``: its image normalisation (default CLIP's). -> the model."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = open_clip.get_model_config(arch) if arch else dict(model_cfg or TINY_OPEN_CLIP)
    size = cfg["vision_cfg"]["image_size"]
    preprocess = {"size": size, "mean": list(mean or open_clip.OPENAI_DATASET_MEAN),
                  "std": list(std or open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{out}")  # config only: random weights
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return model
