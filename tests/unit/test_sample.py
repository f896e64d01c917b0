"""Sampling from a model: greedy decoding is the model's own argmax, step by step; the CLI round-trips bytes."""
import json

import torch
from safetensors.torch import save_file

from hgscale.config import config_from_dict
from hgscale.models import HourglassLM
from hgscale.sample import generate, main

CFG = {"model": {"size": "debug", "hierarchy": "1@1 1@3 1@1", "max_seq_len": 16}, "data": {"url": "x", "seq_len": 16}}


def model_and_cfg():
    cfg = config_from_dict(CFG)
    return HourglassLM(cfg.model, seed=5).eval(), cfg


def test_greedy_is_stepwise_argmax_and_window_slides():
    model, _ = model_and_cfg()
    prompt = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    out = generate(model, prompt, 20, temperature=0)  # 25 tokens > max_seq_len 16: the window slides
    assert out.shape == (2, 25) and torch.equal(out[:, :5], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, model(seq[:, -16:])[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_top_k_one_equals_greedy_and_sampling_is_seeded():
    model, _ = model_and_cfg()
    prompt = torch.tensor([[7, 7, 7]])
    greedy = generate(model, prompt, 8, temperature=0)
    assert torch.equal(generate(model, prompt, 8, temperature=1.0, top_k=1), greedy)
    a = generate(model, prompt, 8, 1.0, 0, torch.Generator().manual_seed(1))
    b = generate(model, prompt, 8, 1.0, 0, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and int(a.max()) < 256


def test_cli_on_an_exported_model(tmp_path, capsys):
    model, cfg = model_and_cfg()
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert main(["--checkpoint", str(tmp_path), "--prompt", "Hi", "--tokens", "6", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    expected = generate(model, torch.tensor([list(b"Hi")]), 6, temperature=0)[0, 2:].tolist()
    assert printed == "Hi" + bytes(expected).decode("utf-8", errors="replace") + "\n"
    assert main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no complete checkpoint at" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--prompt-ids", "1,x"]) == 2
    assert "--prompt-ids '1,x' is not a comma-separated list of integers" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--prompt-ids", "1,256"]) == 2
    assert "prompt ids must lie in [0, 256)" in capsys.readouterr().err
