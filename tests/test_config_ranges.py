"""Every bad config value is refused at load, in one line naming the key and the file (issue 18 part 5).

The class, not the examples: every numeric field of every config dataclass (run sections, towers, and every registered
loss and head config with the dataclasses they nest) declares its range, and a value just outside it is refused."""
import dataclasses
import math
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from mlmm import config as C
from mlmm.config import ConfigError, load_config
from mlmm.typed import from_dict
from mlmm.ranges import check_ranges, parse_range
from mlmm.registry import HEADS, LOSSES

REPO = Path(__file__).resolve().parents[1]


def _numeric(tp) -> bool:
    """int / float, Optional of them, or a list / tuple of them (bool is not numeric)."""
    if tp in (int, float):
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType, list, tuple):
        return any(_numeric(a) for a in typing.get_args(tp) if a not in (type(None), Ellipsis))
    return False


def config_classes() -> list[type]:
    """mlmm's config dataclasses: the run sections, every registered loss / head config, and what they nest."""
    todo = [C.RunConfig, C.DataConfig, C.ModelConfig, C.TrainConfig,
            *(reg.get(n).config for reg in (LOSSES, HEADS) for n in reg.names() if reg.get(n).config)]
    seen: list[type] = []
    while todo:
        cls = todo.pop()
        if cls in seen or not cls.__module__.startswith("mlmm."):  # tests register their own probes
            continue
        seen.append(cls)
        for tp in typing.get_type_hints(cls).values():
            todo += [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
    return sorted(seen, key=lambda c: (c.__module__, c.__name__))


CLASSES = config_classes()
FIELDS = [(cls, f.name) for cls in CLASSES for f in dataclasses.fields(cls)
          if f.init and _numeric(typing.get_type_hints(cls)[f.name])]


def test_the_walk_finds_every_kind_of_config():
    names = {c.__name__ for c in CLASSES}
    assert {"DataConfig", "TrainConfig", "ImageTowerConfig", "AudioTowerConfig", "TeacherConfig",
            "ContrastiveLossConfig", "RCARLossConfig", "DIVTRHeadConfig", "HashHeadConfig"} <= names
    assert len(FIELDS) > 150


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_numeric_field_declares_a_range_that_its_default_meets(cls):
    ranges = getattr(cls, "RANGES", {})
    numeric = [name for c, name in FIELDS if c is cls]
    missing = [n for n in numeric if n not in ranges]
    assert not missing, f"{cls.__module__}.{cls.__name__}: declare the range of {missing} in its RANGES"
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(ranges) <= fields, f"{cls.__name__}.RANGES names no field {sorted(set(ranges) - fields)}"
    for spec in ranges.values():
        parse_range(spec)
    check_ranges(cls(), cls.__name__)  # the defaults are in range


def _outside(spec: str, tp) -> list:
    """Values just outside ``spec`` (and non-finite ones for floats), of the field's type."""
    lo, lo_in, hi, hi_in = parse_range(spec)
    is_int = int in (tp, *typing.get_args(tp)) and float not in (tp, *typing.get_args(tp))
    step = 1 if is_int else 0.5
    out = []
    if math.isfinite(lo):
        out.append(lo - step if lo_in else lo)
    if math.isfinite(hi):
        out.append(hi + step if hi_in else hi)
    out = [int(v) if is_int else float(v) for v in out]
    return out + ([] if is_int else [float("nan"), float("inf")])


@pytest.mark.parametrize("cls,name", FIELDS, ids=[f"{c.__name__}.{n}" for c, n in FIELDS])
def test_a_value_outside_the_range_is_refused_naming_the_key(cls, name):
    tp = typing.get_type_hints(cls)[name]
    spec = cls.RANGES[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    container = typing.get_origin(tp) in (list, tuple) or any(typing.get_origin(a) in (list, tuple) for a in args)
    bad_values = _outside(spec, args[0] if typing.get_origin(tp) is tuple else tp)
    assert bad_values or spec == "any"
    for bad in bad_values:
        value = (bad, *getattr(cls(), name)[1:]) if container else bad
        with pytest.raises(ConfigError) as e:
            from_dict(cls, {name: list(value) if container else value}, "sec")
        msg = str(e.value)
        assert msg.startswith(f"sec.{name}") and "must be" in msg and "\n" not in msg, msg


# ----------------------------------------------------------------------------------- through load_config
@pytest.fixture
def recipe(tmp_path):
    """A run config file with shards and a tokenizer folder that exist."""
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-000000.tar").write_bytes(b"\0" * 1024)
    (tmp_path / "tok").mkdir()
    path = tmp_path / "run.yaml"
    path.write_text((REPO / "recipes" / "configs" / "tiny_clip.yaml").read_text())
    return path, [f"data.train_shards={tmp_path / 'shards'}", f"model.text.tokenizer={tmp_path / 'tok'}",
                  f"output_dir={tmp_path / 'out'}"]


@pytest.mark.parametrize("override,key", [
    ("train.lr=0", "train.lr"), ("train.lr=-1e-3", "train.lr"), ("train.lr=.nan", "train.lr"),
    ("train.lr=.inf", "train.lr"), ("train.lr=nan", "train.lr"), ("train.warmup_steps=-1", "train.warmup_steps"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer"), ("train.save_every=-5", "train.save_every"),
    ("model.embed_dim=0", "model.embed_dim"), ("train.grad_accum=0", "train.grad_accum"),
    ("data.batch_size=0", "data.batch_size"), ("data.max_bad_fraction=1.5", "data.max_bad_fraction"),
    ("data.max_bad_fraction=-0.1", "data.max_bad_fraction"), ("train.betas=[0.9, 1.0]", "train.betas[1]"),
    ("loss.max_logit_scale=.inf", "loss.max_logit_scale"), ("model.image.mlp_ratio=0", "model.image.mlp_ratio"),
    ("data.train_shards=/nowhere/shards", "data.train_shards"), ("data.train_shards=./x-*.tar", "data.train_shards"),
    ("model.text.tokenizer=./no/such/tokenizer", "model.text.tokenizer"),
    ("model.text.tokenizer=~/no-such-tokenizer-here", "model.text.tokenizer"),
    ("train.lr=[1", "train.lr"),
])
def test_examples_are_refused_at_load_in_one_line(recipe, override, key):
    path, base = recipe
    with pytest.raises(ConfigError) as e:
        load_config(path, [*base, override])
    msg = str(e.value)
    assert msg.startswith(f"{path}: {key}") and "\n" not in msg, msg


def test_partially_existing_tokenizer_path_is_local(recipe, tmp_path, monkeypatch):
    path, base = recipe
    monkeypatch.chdir(tmp_path)  # "tok" exists here, so "tok/missing" looks like a local path
    with pytest.raises(ConfigError, match=r"model.text.tokenizer: tok/missing not found"):
        load_config(path, [*base, "model.text.tokenizer=tok/missing"])


@pytest.mark.parametrize("override", [
    "data.train_shards=https://example.com/shards/train-{000000..000009}.tar",
    "data.train_shards=pipe:curl -s https://example.com/a.tar", "data.train_shards=s3://bucket/shards/a.tar",
    "model.text.tokenizer=xlm-roberta-base", "model.text.tokenizer=org/name@v1.0",
])
def test_remote_specs_and_hub_ids_are_left_to_the_code_that_opens_them(recipe, override):
    path, base = recipe
    load_config(path, [*base, override])


def test_trainer_refuses_a_missing_shard_spec_before_building_anything(recipe, tmp_path):
    from mlmm.training import Trainer

    path, base = recipe
    cfg = load_config(path, [*base, "data.train_shards="])
    with pytest.raises(ConfigError, match=f"^{path}: data.train_shards: required"):
        Trainer(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override,key", [("train.lr=-1", "train.lr"),
                                          ("data.train_shards=/nowhere", "data.train_shards"),
                                          ("data.train_shards=", "data.train_shards")])
def test_train_py_prints_one_line_and_exits_2(recipe, tmp_path, override, key):
    path, base = recipe
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    res = subprocess.run([sys.executable, str(REPO / "recipes" / "train.py"), "--config", str(path), *base, override],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith(f"config error: {path}: {key}") and "Traceback" not in res.stderr, lines
    assert not (tmp_path / "out").exists()  # nothing written
