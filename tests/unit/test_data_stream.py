"""Order, packing and exact resume of the stream (local paths, in-process producer)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipelines.demo_corpus import corpus_bytes, write_demo_corpus
from data_pipelines.shards import DatasetWriter
from hgscale.config import DataConfig
from hgscale.data import open_dataset
from hgscale.data.order import EpochPlan, lane_count
from hgscale.data.records import StreamSpec
from tests.batches import assert_same, take


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "demo"
    write_demo_corpus(str(root))
    return open_dataset(DataConfig(url=str(root), num_workers=0))


def test_batches_are_shifted_contiguous_text(ds):
    text = corpus_bytes()
    for x, y in take(ds.stream("train", 4, 128, seed=1), 5):
        assert x.shape == y.shape == (4, 128) and x.dtype == y.dtype == torch.int64
        torch.testing.assert_close(x[:, 1:], y[:, :-1], rtol=0, atol=0)
        for xr, yr in zip(x, y, strict=True):  # every window is a real, contiguous piece of the corpus
            assert bytes(torch.cat([xr, yr[-1:]]).to(torch.uint8).numpy()) in text


def test_order_is_deterministic_in_seed(ds):
    a = take(ds.stream("train", 4, 64, seed=11), 4)
    assert_same(a, take(ds.stream("train", 4, 64, seed=11), 4))
    b = take(ds.stream("train", 4, 64, seed=12), 4)
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True))


def _spec(n_shards: int, tokens: int = 1000, shuffle_shards: int = 2) -> StreamSpec:
    return StreamSpec(root="mem://x", split="train", shards=[{"num_tokens": tokens + 37 * i} for i in range(n_shards)],
                      dtype="uint8", modality="text", seq_len=16, micro_batch_size=1, seed=5, shuffle=True,
                      shuffle_shards=shuffle_shards, dp_rank=0, dp_size=1, on_corrupt="error", image_tokens=0,
                      global_batch_size=1)


def test_lanes_are_equal_and_ranks_read_their_own_lanes():
    assert [lane_count(n) for n in (1, 13, 16, 63, 64, 256, 5000)] == [1, 1, 1, 2, 4, 16, 64]
    for n in (64, 200):
        plan = EpochPlan(_spec(n), 0)
        L = plan.n_lanes
        lens = np.diff(plan.lane_start)
        assert plan.windows == sum(plan.counts) == lens.sum() and lens.max() - lens.min() <= 1
        # every window of the epoch sits in exactly one (lane, block) slot
        seen = sorted(plan.source(lane, j, int(p))
                      for lane in range(L) for j in range(-(-int(lens[lane]) // plan.block))
                      for p in plan.block_perm(lane, j))
        assert seen == sorted((s, w) for s in range(n) for w in range(plan.counts[s]))
        G = 2 * L
        for D in (1, 2, 4):  # whole rounds: rank r reads lanes [r L/D, (r + 1) L/D) only, all epoch long
            for off in range(0, plan.usable(G), G):
                slots = [plan.rank_slots(off, G, r, D) for r in range(D)]
                assert sum(len(s) for s in slots) == G
                for r, s in enumerate(slots):
                    assert set(s[:, 0].tolist()) <= set(range(r * L // D, (r + 1) * L // D))
    assert EpochPlan(_spec(64), 0).order.tolist() != EpochPlan(_spec(64), 1).order.tolist()


def test_dp_ranks_read_disjoint_text_and_cover_an_epoch(ds):
    seq = 256
    seen = []
    for rank in (0, 1):
        stream = ds.stream("train", 1, seq, rank, 2, seed=3, shuffle=False)
        rows = torch.cat([x for x, _ in take(stream, 1000)])  # > 1 epoch of this rank
        seen.append({bytes(r.to(torch.uint8).numpy()) for r in rows})
    assert not seen[0] & seen[1]
    # one epoch without shuffling covers all but < seq_len + 1 tokens per shard
    n_shards = len(ds.manifest["splits"]["train"]["shards"])
    covered = (len(seen[0]) + len(seen[1])) * seq
    assert ds.num_tokens("train") - n_shards * (seq + 1) <= covered <= ds.num_tokens("train")


@pytest.mark.parametrize("cut,epoch", [(1, 0), (7, 0), (40, 1), (95, 2)])  # mid-shard ... 2 epochs on
def test_exact_resume_in_process(ds, cut, epoch):
    B, T = 64, 200  # ~ 32 batches per epoch
    full = take(ds.stream("train", B, T, seed=9), cut + 12)
    s = ds.stream("train", B, T, seed=9)
    it = iter(s)
    for _ in range(cut):
        next(it)
    state = json.loads(json.dumps(s.state_dict()))  # survives a checkpoint's JSON
    s.close()
    assert state["epoch"] == epoch
    r = ds.stream("train", B, T, seed=9)
    r.load_state_dict(state)
    assert_same(take(r, 12), full[cut:])


@pytest.mark.parametrize("cut", [3, 55])  # mid-epoch; after the epoch boundary (52 batches of 8 x 1000)
def test_resume_on_another_layout_continues_the_one_order(ds, cut):
    G, T = 8, 1000
    one = ds.stream("train", 2, T, seed=4, global_batch_size=G)  # 1 rank x 4 micro-batches per batch
    full = take(one, 4 * (cut + 3))
    one = ds.stream("train", 2, T, seed=4, global_batch_size=G)
    it = iter(one)
    for _ in range(4 * cut):
        next(it)
    state = json.loads(json.dumps(one.state_dict()))
    one.close()
    assert state["micro"] == 0 and (state["epoch"] >= 1) == (cut == 55)
    rows = [[] for _ in range(3)]
    for r in range(2):  # 2 ranks x 2 micro-batches of 2
        s = ds.stream("train", 2, T, r, 2, seed=4, global_batch_size=G)
        s.load_state_dict(state)
        for j, (x, _) in enumerate(take(s, 6)):
            rows[j // 2].extend(bytes(row.to(torch.uint8).numpy()) for row in x)
    for j in range(3):
        want = [bytes(row.to(torch.uint8).numpy()) for x, _ in full[4 * (cut + j):4 * (cut + j + 1)] for row in x]
        assert sorted(rows[j]) == sorted(want)


def test_epochs_differ_and_repeat_the_data(ds):
    B, T = 1, 512
    per_epoch = sum((s["num_tokens"] - 1) // T - 1 for s in ds.manifest["splits"]["train"]["shards"])
    batches = take(ds.stream("train", B, T, seed=2), 3 * per_epoch)
    e0 = {bytes(x[0, :32].to(torch.uint8).numpy()) for x, _ in batches[:per_epoch // 2]}
    e1 = [bytes(x[0, :32].to(torch.uint8).numpy()) for x, _ in batches[per_epoch + 30:per_epoch + 30 + per_epoch // 2]]
    assert sum(w in e0 for w in e1) < len(e1) // 2  # a new order (and new offsets) each epoch


def test_batches_mix_the_shards_of_a_block(ds):
    text = corpus_bytes()
    ends = np.cumsum([s["num_tokens"] for s in ds.manifest["splits"]["train"]["shards"]])
    x, _ = take(ds.stream("train", 16, 128, seed=1), 1)[0]
    origin = {int(np.searchsorted(ends, text.find(bytes(r.to(torch.uint8).numpy())), side="right")) for r in x}
    assert len(origin) >= 3  # a block mixes shuffle_shards (4) shards' windows


def test_changed_order_resumes_at_epoch_start(ds, caplog):
    s = ds.stream("train", 4, 64, seed=1)
    take(s, 3)
    state = s.state_dict()
    assert (state["epoch"], state["offset"], state["micro"]) == (0, 12, 0)
    # the shard grouping decides the order, so a state saved with another cannot resume exactly
    regrouped = open_dataset(DataConfig(url=ds.root, shuffle_shards=2, num_workers=0)).stream("train", 4, 64, seed=1)
    regrouped.load_state_dict(state)
    assert "shuffle_shards 4 -> 2" in caplog.text and regrouped.state_dict()["offset"] == 0


def test_eval_batches_split_windows_between_ranks(ds):
    one = list(ds.eval_batches("valid", 4, 128))
    two = [list(ds.eval_batches("valid", 2, 128, r, 2)) for r in (0, 1)]
    assert len(two[0]) == len(two[1]) > 0
    x1 = torch.cat([x for x, _ in one])
    x2 = torch.stack([torch.cat([x for x, _ in two[0]]), torch.cat([x for x, _ in two[1]])], 1).flatten(0, 1)
    torch.testing.assert_close(x2, x1[:len(x2)], rtol=0, atol=0)  # window i on rank i mod 2, file order
    valid = ds.split_tokens("valid")
    torch.testing.assert_close(x1[0], valid[:128], rtol=0, atol=0)
    torch.testing.assert_close(one[0][1][0], valid[1:129], rtol=0, atol=0)
    assert len(list(ds.eval_batches("valid", 4, 128, max_batches=2))) == 2


def test_image_windows_label_every_pixel_once(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 48), dtype=np.uint8)  # 4x4 RGB
    with DatasetWriter(str(tmp_path / "img"), name="img", modality="image", vocab_size=256, shard_bytes=1,
                       extra={"sample_tokens": 48}) as w:
        for i, im in enumerate(images):
            w.add("test" if i >= 8 else "train", im, label=i)
    img = open_dataset(DataConfig(url=str(tmp_path / "img"), num_workers=0))
    assert img.metric_name == "bpd" and len(img.manifest["splits"]["train"]["shards"]) == 8
    batches = list(img.eval_batches("train", 2, 48))
    labels = torch.cat([y for _, y in batches]).flatten()
    stream = torch.from_numpy(images[:8].reshape(-1).astype(np.int64))
    torch.testing.assert_close(labels, torch.cat([stream[1:], stream[:1]]), rtol=0, atol=0)
    # training windows with seq_len = one image are whole images in a shuffled order
    xs = torch.cat([x for x, _ in take(img.stream("train", 4, 48, seed=0), 2)])
    got = sorted(bytes(r.to(torch.uint8).numpy()) for r in xs)
    assert got == sorted(bytes(im) for im in images[:8])


def test_lane_reads_state_the_read_amplification_of_every_data_parallel_size():
    from hgscale.data.order import lane_reads

    assert [lane_reads(16, d) for d in (1, 2, 4, 8, 16)] == [1.0] * 5  # sizes dividing the lanes read once
    assert (lane_reads(16, 3), lane_reads(16, 6), lane_reads(16, 12)) == (1.125, 1.25, 1.5)
    assert lane_reads(1, 4) == 4.0 and lane_reads(4, 8) == 2.0  # more ranks than lanes: lanes read several times
    from hgscale.data.order import read_amplification

    # bytes, measured by benchmarks/elastic_resume.py on 256 equal shards: 1.059, 1.192, 1.325, 1.593
    for d, measured in ((1, 1.059), (3, 1.192), (6, 1.325), (12, 1.593)):
        assert read_amplification(256, d) == pytest.approx(measured, rel=0.01), d


def test_preflight_warns_when_ranks_share_lanes():
    from types import SimpleNamespace

    from hgscale.config import config_from_dict
    from hgscale.training.preflight import read_amplification_warning

    cfg = config_from_dict({"model": {"size": "debug"}, "data": {"url": "/d", "seq_len": 32},
                            "train": {"micro_batch_size": 1}})
    ds = SimpleNamespace(manifest={"splits": {"train": {"shards": [{}] * 256}}})  # 16 lanes
    assert read_amplification_warning(cfg, ds, 8) is None
    msg = read_amplification_warning(cfg, ds, 6)
    assert "6 data-parallel ranks read about 1.32x the 256-shard split 'train'" in msg
    assert "dividing 16 (1, 2, 4, 8, 16)" in msg
