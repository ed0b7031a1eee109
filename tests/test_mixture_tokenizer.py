"""Mixture sources must share one tokenizer: the same vocabulary and EOD id, and
the same tokenizer.json wherever a source has one."""

from __future__ import annotations

import copy
import json
import shutil
from collections import Counter

import pytest
from helpers import make_dataset, make_two_sources
from test_config import make_cfg

import megagpt.data.source
from megagpt.config import SourceConfig
from megagpt.data.shards import DataError, open_dataset
from megagpt.data.source import open_training_data
from megagpt.runtime import Env

ONE_RANK = Env(rank=0, world_size=1, local_rank=0, local_world_size=1)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """a and b share a's tokenizer; c was prepared with a tokenizer of its own,
    trained on other texts to the same vocabulary size."""
    root = tmp_path_factory.mktemp("tok")
    a, b = make_two_sources(root)
    c = make_dataset(root / "c", n_docs=60, docs_per_shard=6, seed=3)
    return {"a": a, "b": b, "c": c}


@pytest.fixture(scope="module")
def mixture_cfg():
    return make_cfg("data=mixture", "data.seq_len=16", "logger=none")


def open_mixture(cfg, named):
    cfg = copy.deepcopy(cfg)
    cfg.data.sources = [SourceConfig(name=name, urls=str(path)) for name, path in named]
    return open_training_data(cfg, ONE_RANK)


def without_tokenizer(path, dest):
    shutil.copytree(path, dest)
    (dest / "tokenizer.json").unlink()
    return dest


def test_the_other_tokenizer_has_the_same_vocabulary(sources):
    """What makes the tests below about the tokenizer file and not the vocabulary."""
    a, c = open_dataset(str(sources["a"])), open_dataset(str(sources["c"]))
    assert (a.vocab_size, a.eod_id) == (c.vocab_size, c.eod_id)
    assert (sources["a"] / "tokenizer.json").read_bytes() != (sources["c"] / "tokenizer.json").read_bytes()


def test_sources_sharing_a_tokenizer_mix_and_each_tokenizer_is_read_once(sources, mixture_cfg, monkeypatch):
    reads = Counter()
    real_read = megagpt.data.source.read_bytes

    def counting_read(url):
        reads[url] += 1
        return real_read(url)

    monkeypatch.setattr(megagpt.data.source, "read_bytes", counting_read)
    data = open_mixture(mixture_cfg, [("a", sources["a"]), ("b", sources["b"]), ("a2", sources["a"])])
    assert data.mix.names == ["a", "b", "a2"]
    assert reads == {f"{sources['a']}/tokenizer.json": 1, f"{sources['b']}/tokenizer.json": 1}


def test_a_source_with_another_tokenizer_stops_with_one_line_naming_both(sources, mixture_cfg):
    a, c = sources["a"], sources["c"]
    with pytest.raises(DataError) as e:
        open_mixture(mixture_cfg, [("a", a), ("b", sources["b"]), ("c", c)])
    assert str(e.value) == (
        f"data.sources: c and a were prepared with different tokenizers ({c}/tokenizer.json and "
        f"{a}/tokenizer.json differ); prepare every source with one --tokenizer"
    )


def test_a_source_without_a_tokenizer_file_is_left_to_the_vocabulary_check(sources, mixture_cfg, tmp_path):
    bare_b = without_tokenizer(sources["b"], tmp_path / "b")
    assert open_mixture(mixture_cfg, [("b", bare_b), ("a", sources["a"])]).mix.names == ["b", "a"]
    with pytest.raises(DataError, match="^data.sources: c and a were prepared with different tokenizers"):
        open_mixture(mixture_cfg, [("b", bare_b), ("a", sources["a"]), ("c", sources["c"])])


def test_the_same_tokenizer_written_another_way_is_the_same(sources, mixture_cfg, tmp_path):
    reformatted = tmp_path / "b"
    shutil.copytree(sources["b"], reformatted)
    tok = reformatted / "tokenizer.json"
    tok.write_text(json.dumps(json.loads(tok.read_text()), indent=4, sort_keys=True))
    assert open_mixture(mixture_cfg, [("a", sources["a"]), ("b", reformatted)]).mix.names == ["a", "b"]
