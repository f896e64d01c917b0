"""Sampling: cached generation equals generation by recomputation token for token (windows sliding past
max_seq_len included); top-k / top-p / seeds / stop tokens / streaming; the CLI for text (stdout, --out,
MLflow artifact of the checkpoint's run) and for images (a PNG grid whose pixels are the sampled bytes)."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from data_pipelines.shards import DatasetWriter
from hgscale.commands.sample import main
from hgscale.config import config_from_dict
from hgscale.models import HourglassLM
from hgscale.models.generation import filter_logits, generate
from hgscale.tracking.images import PAD, cell_origin, image_grid, sample_images, tokens_to_images

CFG = {"model": {"size": "debug", "hierarchy": "1@1 1@3 1@1", "max_seq_len": 16,
                 "downsample": "attention_linear", "upsample": "attention_repeat"},
       "data": {"url": "x", "seq_len": 16}}
SHAPE = (4, 2, 3)  # tiny "images": 4 rows x 2 columns x RGB = 24 tokens


def model_and_cfg(cfg=CFG, seed=5):
    cfg = config_from_dict(cfg)
    return HourglassLM(cfg.model, seed=seed).eval(), cfg


def export(tmp_path, model, cfg):
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    return str(tmp_path)


def test_greedy_with_cache_equals_recomputation_and_the_window_slides():
    model, _ = model_and_cfg()
    prompt = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    cached = generate(model, prompt, 30, temperature=0)  # 35 tokens > max_seq_len 16: two re-prefills
    recomputed = generate(model, prompt, 30, temperature=0, use_cache=False)
    assert cached.shape == (2, 35) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, recomputed)
    seq, start = prompt, 0  # the documented windows: restart from the last max_seq_len // 2 tokens
    with torch.no_grad():
        for _ in range(30):
            if seq.shape[1] - start > 16:
                start = seq.shape[1] - 8
            seq = torch.cat([seq, model(seq[:, start:])[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, seq)
    long = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(0))  # prompt > max_seq_len
    assert torch.equal(generate(model, long, 6, temperature=0), generate(model, long, 6, temperature=0,
                                                                          use_cache=False))


def test_sampling_is_seeded_and_top_k_one_or_tiny_top_p_is_greedy():
    model, _ = model_and_cfg()
    prompt = torch.tensor([[7, 7, 7], [1, 2, 3]])
    greedy = generate(model, prompt, 12, temperature=0)
    assert torch.equal(generate(model, prompt, 12, temperature=1.0, top_k=1), greedy)
    assert torch.equal(generate(model, prompt, 12, temperature=1.0, top_p=1e-6), greedy)
    a = generate(model, prompt, 12, 1.0, 0, torch.Generator().manual_seed(1), top_p=0.9)
    b = generate(model, prompt, 12, 1.0, 0, torch.Generator().manual_seed(1), top_p=0.9, use_cache=False)
    c = generate(model, prompt, 12, 1.0, 0, torch.Generator().manual_seed(2), top_p=0.9)
    assert torch.equal(a, b) and not torch.equal(a, c) and int(a.max()) < 256


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
    p = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(p.log(), top_p=0.7)) == [1, 3]            # 0.4 + 0.3 reaches 0.7
    assert kept(filter_logits(p.log(), top_p=0.71)) == [1, 3, 4]
    assert kept(filter_logits(p.log(), top_k=2)) == [1, 3]
    assert kept(filter_logits(p.log(), top_k=3, top_p=0.5)) == [1, 3]  # nucleus renormalised within the top 3
    torch.testing.assert_close(filter_logits(p.log(), top_p=0.71)[0, [1, 3, 4]], p.log()[0, [1, 3, 4]])


def test_stop_token_ends_each_row_and_pads_it():
    model, _ = model_and_cfg()
    prompt = torch.tensor([[3, 1, 4], [9, 2, 6]])
    free = generate(model, prompt, 10, temperature=0)
    stop = int(free[0, 5])  # row 0's third new token
    first = [int((free[r, 3:] == stop).nonzero()[0]) if (free[r, 3:] == stop).any() else 10 for r in range(2)]
    out = generate(model, prompt, 10, temperature=0, stop=stop)
    assert out.shape[1] == 3 + min(10, max(first) + 1)
    for r in range(2):
        n = min(first[r] + 1, out.shape[1] - 3)
        assert torch.equal(out[r, : 3 + n], free[r, : 3 + n])
        assert (out[r, 3 + n:] == stop).all()


def test_generate_bad_input():
    model, _ = model_and_cfg()
    msg = r"temperature = -1 must be >= 0 \(0 = greedy\); top_p = 0 must be in \(0, 1\]"
    with pytest.raises(ValueError, match=msg):
        generate(model, torch.tensor([[1]]), 3, temperature=-1, top_p=0)
    with pytest.raises(ValueError, match=r"prompt id 300 is outside the vocabulary: prompt ids must lie in \[0, 256\)"):
        generate(model, torch.tensor([[300]]), 3)
    with pytest.raises(ValueError, match=r"prompt id -2 is outside"):
        generate(model, torch.tensor([[1, -2]]), 3)
    with pytest.raises(ValueError, match=r"LongTensor \(batch >= 1, length >= 1\); got torch.int64 \(0, 3\)"):
        generate(model, torch.zeros(0, 3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"prompt must be a LongTensor .*; got list"):
        generate(model, [[1, 2]], 3)


class Recorder(io.StringIO):
    """stdout that remembers each write: streaming shows up as many writes."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def test_cli_streams_text_and_writes_samples(tmp_path, monkeypatch, capsys):
    model, cfg = model_and_cfg()
    path = export(tmp_path, model, cfg)
    out = Recorder()
    monkeypatch.setattr("sys.stdout", out)
    assert main(["--checkpoint", path, "--prompt", "Hi", "--tokens", "6", "--temperature", "0"]) == 0
    expected = generate(model, torch.tensor([list(b"Hi")]), 6, temperature=0)[0, 2:].tolist()
    text = "Hi" + bytes(expected).decode("utf-8", errors="replace")
    assert out.getvalue() == text + "\n" and len(out.writes) >= 4  # the prompt, then token by token
    monkeypatch.undo()
    assert main(["--checkpoint", path, "--prompt", "ab", "--tokens", "5", "--samples", "3", "--seed", "3",
                 "--top-k", "5", "--out", str(tmp_path / "s.txt")]) == 0
    rows = generate(model, torch.tensor([list(b"ab")] * 3), 5, 1.0, 5, torch.Generator().manual_seed(3))
    want = "".join(f"--- sample {i} ---\nab{bytes(r[2:]).decode('utf-8', errors='replace')}\n"
                   for i, r in enumerate(rows.tolist()))
    assert (tmp_path / "s.txt").read_text() == want and capsys.readouterr().out == want


def test_cli_bad_input(tmp_path, capsys):
    model, cfg = model_and_cfg()
    path = export(tmp_path, model, cfg)
    cases = [(["--checkpoint", str(tmp_path / "missing")], "no complete checkpoint at"),
             (["--checkpoint", path, "--prompt-ids", "1,x"], "--prompt-ids '1,x' is not a comma-separated list"),
             (["--checkpoint", path, "--prompt-ids", "1,256"], r"prompt ids must lie in [0, 256)"),
             (["--checkpoint", path, "--stop", "ab"], "--stop 'ab' must be one byte"),
             (["--checkpoint", path, "--top-p", "1.5"], "top_p = 1.5 must be in (0, 1]"),
             (["--checkpoint", path, "--images", "2"], "cannot be opened"),
             (["--checkpoint", path, "--images", "2", "--complete", "2"], "not both")]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        assert msg in capsys.readouterr().err, argv


def test_cli_names_no_cache_for_an_lsh_model(tmp_path, capsys):
    lsh = {**CFG, "model": {**CFG["model"], "attention": "rotary", "vanilla_attention": "lsh", "lsh_chunk_len": 4}}
    path = export(tmp_path, *model_and_cfg(lsh))
    assert main(["--checkpoint", path, "--tokens", "2"]) == 2
    assert "model.vanilla_attention = 'lsh'" in capsys.readouterr().err
    assert main(["--checkpoint", path, "--tokens", "2", "--no-cache", "--prompt", "ab"]) == 0
    assert capsys.readouterr().out.startswith("ab")


def test_cli_stop_byte(tmp_path, capsys):
    model, cfg = model_and_cfg()
    path = export(tmp_path, model, cfg)
    free = generate(model, torch.tensor([list(b"Hi")]), 8, temperature=0)[0, 2:].tolist()
    stop = free[2]
    assert main(["--checkpoint", path, "--prompt", "Hi", "--tokens", "8", "--temperature", "0",
                 "--stop-id", str(stop)]) == 0
    cut = free[: free.index(stop) + 1]
    assert capsys.readouterr().out == "Hi" + bytes(cut).decode("utf-8", errors="replace") + "\n"


# ------------------------------------------------------------------------------------------- images

def image_dataset(root, modality="image", n=5, seed=0):
    rng = np.random.default_rng(seed)
    px = rng.integers(0, 256, size=(n, int(np.prod(SHAPE))), dtype=np.uint8)
    extra = {"sample_tokens": px.shape[1], "image_shape": list(SHAPE)} if modality == "image" else {}
    with DatasetWriter(str(root), name="tiny", modality=modality, vocab_size=256, extra=extra) as w:
        for split in ("train", "valid", "test"):
            w.add(split, px.reshape(-1))
    return px.astype(np.int64)


def image_model(tmp_path, data_url):
    cfg = {"model": {"size": "debug", "hierarchy": "1@1 1@2 1@1", "max_seq_len": 24},
           "data": {"url": str(data_url), "seq_len": 24}}
    model, cfg = model_and_cfg(cfg, seed=2)
    (tmp_path / "model").mkdir()
    return model, export(tmp_path / "model", model, cfg)


def cells(png, n, cols):
    img = np.asarray(Image.open(png).convert("RGB"))
    return img, [img[y: y + SHAPE[0], x: x + SHAPE[1]] for y, x in (cell_origin(i, cols, SHAPE) for i in range(n))]


def test_image_grid_png_holds_the_sampled_bytes(tmp_path):
    originals = image_dataset(tmp_path / "data")
    model, path = image_model(tmp_path, tmp_path / "data")
    assert main(["--checkpoint", path, "--images", "4", "--seed", "9", "--out", str(tmp_path / "grid.png")]) == 0
    img, got = cells(tmp_path / "grid.png", 4, cols=2)
    assert Image.open(tmp_path / "grid.png").format == "PNG"
    assert img.shape == (2 * (SHAPE[0] + PAD) + PAD, 2 * (SHAPE[1] + PAD) + PAD, 3)
    want = sample_images(model, originals[:4], 1, torch.Generator().manual_seed(9))
    assert (want[:, 0] == originals[:4, 0]).all()  # each image starts from a test image's first sub-pixel
    for i in range(4):
        np.testing.assert_array_equal(got[i], want[i].reshape(SHAPE))
    assert (img[:PAD] == 255).all() and (img[:, :PAD] == 255).all()  # white padding around the cells


def test_completions_keep_the_top_half_beside_the_original(tmp_path):
    originals = image_dataset(tmp_path / "data", n=2)
    model, path = image_model(tmp_path, tmp_path / "data")
    assert main(["--checkpoint", path, "--complete", "3", "--temperature", "0", "--out", str(tmp_path / "c.png")]) == 0
    _, got = cells(tmp_path / "c.png", 6, cols=4)  # 3 (completion, original) pairs, 2 pairs per row
    half = SHAPE[0] // 2
    for i in range(3):
        orig = originals[i % 2].reshape(SHAPE)
        np.testing.assert_array_equal(got[2 * i + 1], orig)
        np.testing.assert_array_equal(got[2 * i][:half], orig[:half])
    greedy = generate(model, torch.from_numpy(originals[:1, : half * SHAPE[1] * 3]), 12, temperature=0)
    np.testing.assert_array_equal(got[0], greedy[0].numpy().reshape(SHAPE))


def test_grid_bad_input():
    with pytest.raises(ValueError, match=r"25 tokens are no whole number of \(4, 2, 3\) images \(24 tokens each\)"):
        tokens_to_images(np.zeros((1, 25)), SHAPE)
    with pytest.raises(ValueError, match=r"pixel tokens must lie in \[0, 255\]"):
        tokens_to_images(np.full((1, 24), 256), SHAPE)
    with pytest.raises(ValueError, match=r"takes \(N, H, W, C\) images; got shape \(4, 2, 3\)"):
        image_grid(np.zeros(SHAPE, np.uint8))
    with pytest.raises(ValueError, match="images have 2 channels"):
        image_grid(np.zeros((1, 4, 2, 2), np.uint8))
    assert tokens_to_images(np.arange(48) % 256, SHAPE).shape == (2, *SHAPE)


def test_images_on_a_text_model_is_an_error(tmp_path, capsys):
    image_dataset(tmp_path / "data", modality="text_bytes")
    _, path = image_model(tmp_path, tmp_path / "data")
    assert main(["--checkpoint", path, "--images", "16"]) == 2
    err = capsys.readouterr().err
    assert "--images 16: this model was trained on text_bytes data" in err and "--prompt" in err


# ----------------------------------------------------------------------------------- MLflow artifact

def training_checkpoint(root, model, cfg, run_id):
    """A checkpoint in the layout hgscale.checkpoint writes (ZeRO-0, one stage) holding ``run_id``."""
    tag = root / "step00000001"
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
    meta = {"step": 1, "run_id": run_id, "config": cfg.to_dict(), "topology": {"pipeline_stages": 1, "zero_stage": 0}}
    (tag / "hgscale.json").write_text(json.dumps(meta))
    (tag / "COMPLETE").write_text("")
    (root / "latest").write_text(tag.name)
    return str(root)


@pytest.mark.integration
def test_samples_are_logged_to_the_checkpoints_mlflow_run(tmp_path, mlflow_server, capsys):
    """The shared real mlflow server (tests/fixtures/mlflow_server.py) holds the training run."""
    from mlflow.tracking import MlflowClient

    model, cfg = model_and_cfg({**CFG, "run_dir": str(tmp_path / "run"), "tracking": {"uri": mlflow_server.uri}})
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run_id = client.create_run(client.create_experiment("sample-artifact")).info.run_id
    ckpt = training_checkpoint(tmp_path / "ckpt", model, cfg, run_id)
    out = tmp_path / "samples.txt"
    assert main(["--checkpoint", ckpt, "--prompt", "x", "--tokens", "4", "--out", str(out)]) == 0
    assert f"logged {out} to MLflow run {run_id}" in capsys.readouterr().err
    assert [a.path for a in client.list_artifacts(run_id)] == ["samples.txt"]
    local = client.download_artifacts(run_id, "samples.txt", str(tmp_path / "dl"))
    assert open(local).read() == out.read_text() and out.read_text().startswith("--- sample 0 ---\nx")
