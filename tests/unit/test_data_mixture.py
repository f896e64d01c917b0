"""Weighted mixtures of datasets: config errors, source agreement, shares, determinism, exact resume, eval."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_pipelines.shards import DatasetWriter
from hgscale.config import ConfigError, DataConfig, config_from_dict
from hgscale.data import DataError, open_dataset
from hgscale.data.mixture import Mixture, choices, combine_eval
from tests.batches import assert_same, take

T, B = 16, 4


def write(root, alphabet: bytes, n: int = 40_000, vocab: int = 256, seed: int = 0, modality="text_bytes") -> str:
    rng = np.random.default_rng(seed)
    data = np.frombuffer(alphabet, np.uint8)[rng.integers(0, len(alphabet), n)]
    with DatasetWriter(str(root), name=root.name, modality=modality, vocab_size=vocab, shard_bytes=4096) as w:
        w.write_stream("train", data, sample_tokens=1024)
        w.write_stream("valid", data[: n // 4], sample_tokens=1024)
    return str(root)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mix")
    return write(tmp / "letters", b"abcdefghijklmnopqrstuvwxyz"), write(tmp / "digits", b"0123456789", seed=1)


def cfg(letters, digits, wa=0.8, wb=0.2, **kw) -> DataConfig:
    return DataConfig(mixture=[{"name": "letters", "url": letters, "weight": wa},
                               {"name": "digits", "url": digits, "weight": wb}], num_workers=0, **kw)


def source_of(row: torch.Tensor) -> str:
    return "digits" if int(row.max()) <= ord("9") else "letters"


def test_windows_come_from_each_source_in_proportion_to_its_weight(sources):
    ds = open_dataset(cfg(*sources))
    assert isinstance(ds, Mixture) and ds.vocab_size == 256 and ds.metric_name == "bpc"
    stream = ds.stream("train", B, T)
    batches = take(stream, 250)  # 1,000 windows
    rows = [source_of(x[i]) for x, _ in batches for i in range(B)]
    assert all(set(x[i].tolist()) <= set(range(ord("0"), ord("9") + 1)) or min(x[i].tolist()) >= ord("a")
               for x, _ in batches for i in range(B))  # a row never mixes sources
    share = rows.count("letters") / len(rows)
    assert abs(share - 0.8) < 0.05
    counts = stream.source_tokens
    assert counts == {"letters": rows.count("letters") * T, "digits": rows.count("digits") * T}
    for x, y in batches:
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_same_seed_same_windows_and_exact_resume(sources):
    ds = open_dataset(cfg(*sources))
    straight = take(ds.stream("train", B, T, seed=7), 40)
    assert_same(straight, take(ds.stream("train", B, T, seed=7), 40))
    other = take(ds.stream("train", B, T, seed=8), 40)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(straight, other, strict=True))
    s1 = ds.stream("train", B, T, seed=7)
    first = take(s1, 17)
    state = s1.state_dict()
    s2 = ds.stream("train", B, T, seed=7)
    s2.load_state_dict(state)
    assert_same(first + take(s2, 23), straight)
    assert s2.source_tokens["letters"] + s2.source_tokens["digits"] == 40 * B * T  # counts resume too


def test_choices_are_a_pure_function_of_seed_and_index():
    p = np.array([0.8, 0.2])
    whole = choices(3, 0, 10_000, p)
    assert np.array_equal(np.concatenate([choices(3, 0, 4_000, p), choices(3, 4_000, 6_000, p)]), whole)
    assert not np.array_equal(choices(4, 0, 10_000, p), whole)
    assert abs(whole.mean() - 0.2) < 0.02


def test_the_global_batches_do_not_depend_on_the_data_parallel_size(sources):
    """Global batch j of 2 ranks x 2 micro-batches of 2 = global batch j of 1 rank x 1 micro-batch of 8."""
    ds = open_dataset(cfg(*sources))
    one = take(ds.stream("train", 8, T, 0, 1, seed=5, global_batch_size=8), 6)
    ranks = [take(ds.stream("train", 2, T, r, 2, seed=5, global_batch_size=8), 12) for r in (0, 1)]
    for j in range(6):  # rank r holds positions [4 r, 4 r + 4) of each global batch, as 2 micro-batches
        x = torch.cat([ranks[r][2 * j + a][0] for r in (0, 1) for a in (0, 1)])
        torch.testing.assert_close(x, one[j][0], rtol=0, atol=0)
    # and a state saved by the 2-rank run at a batch boundary resumes the 1-rank run there
    s = ds.stream("train", 2, T, 1, 2, seed=5, global_batch_size=8)
    take(s, 6)
    state = s.state_dict()
    resumed = ds.stream("train", 8, T, 0, 1, seed=5, global_batch_size=8)
    resumed.load_state_dict(state)
    assert resumed.source_tokens == s.source_tokens
    assert_same(take(resumed, 3), one[3:6])


def test_config_errors_for_bad_mixtures():
    good = {"name": "a", "url": "/x", "weight": 1}
    cases = [
        ({"url": "/d", "mixture": [good]}, "data.mixture and data.url = '/d' are both set"),
        ({"mixture": [good, {"name": "b", "url": "/y", "weight": 0}]},
         r"data.mixture\[1\].weight = 0 must be a number > 0"),
        ({"mixture": [{"name": "b", "url": "/y", "weight": -2}]}, "weight = -2 must be a number > 0"),
        ({"mixture": [good, dict(good)]}, "'a' is used twice"),
        ({"mixture": [{"name": "a b", "url": "/y", "weight": 1}]}, "name = 'a b' must be"),
        ({"mixture": [{"name": "a", "url": "/y"}]}, "exactly the keys name, url, weight"),
    ]
    for data, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            config_from_dict({"data": data})
    assert config_from_dict({"data": {"mixture": [good]}}).data.mixture == [good]


def test_sources_must_agree_on_vocabulary_and_tokenizer(tmp_path, sources):
    wide = write(tmp_path / "wide", b"xyz", vocab=300, modality="text_sentencepiece")
    with pytest.raises(DataError, match=r"sources 'letters' .* vocab 256\) and 'digits' .* vocab 300\) differ"):
        open_dataset(cfg(sources[0], wide))
    other = write(tmp_path / "other", b"xyz", vocab=300, modality="text_sentencepiece")
    (tmp_path / "wide" / "tokenizer.model").write_bytes(b"model one")
    (tmp_path / "other" / "tokenizer.model").write_bytes(b"model two")
    for d in ("wide", "other"):  # tokenizer files beside the shards, as the SentencePiece pipeline writes them
        import json
        m = json.loads((tmp_path / d / "manifest.json").read_text())
        m["tokenizer"] = "tokenizer.model"
        (tmp_path / d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="use different SentencePiece models"):
        open_dataset(cfg(wide, other))


def test_eval_sets_per_source_and_their_combination(sources):
    ds = open_dataset(cfg(*sources))
    sets = ds.eval_sets("valid", B, T, max_batches=3)
    assert [n for n, _, _ in sets] == ["letters", "digits"] and all(len(b) == 3 for _, b, _ in sets)
    assert source_of(sets[0][1][0][0][0]) == "letters" and source_of(sets[1][1][0][0][0]) == "digits"
    assert len(list(ds.eval_batches("valid", B, T, max_batches=3))) == 6
    f = 1 / math.log(2)
    loss, bits = combine_eval([(2.0, 100, f), (1.0, 300, f / 2)])  # bytes: 100 + 600; bits: (200 + 300) / ln 2
    assert loss == pytest.approx(1.25) and bits == pytest.approx(500 / math.log(2) / 700)
    # the training factor: tokens from source k with probability p_k
    assert ds.bits_per_nat_token_for("train") == pytest.approx(f)
    with pytest.raises(DataError, match="a mixture has no single 'test' split"):
        ds.split_tokens("test")
