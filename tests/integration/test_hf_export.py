"""`hgscale export --format hf`: a directory transformers loads without hgscale, with hgscale's logits, the Hourglass
cache in generate(), a byte-level AutoTokenizer, and `model.init_from` back into training."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hgscale.checkpoint.export import load_any
from hgscale.config import load_config
from hgscale.models import HourglassLM
from hgscale.models.generation import generate
from tests.integration.train_helpers import (  # noqa: F401
    ROOT,
    TRAIN,
    demo_data,
    env,
    launch,
    metrics,
    tiny_config,
    trained_checkpoint,
)

pytestmark = pytest.mark.integration
PROMPT = "The with statement"

# Runs where hgscale cannot be imported: the exported directory must stand on torch and transformers alone
ALONE = """
import sys, torch
sys.modules["hgscale"] = None  # any `import hgscale...` now raises ImportError
from transformers import AutoModelForCausalLM, AutoTokenizer
d, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
torch.manual_seed(0)
x = torch.randint(0, 256, (2, 75))
ids = tok(%r, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(x).logits
greedy = model.generate(ids, max_new_tokens=60, do_sample=False)
pair = model.generate(torch.cat([ids, ids]), max_new_tokens=12, do_sample=True, top_p=0.9, temperature=0.8)
torch.save({"x": x, "ids": ids, "logits": logits, "greedy": greedy, "text": tok.decode(greedy[0]),
            "pair": pair, "type": type(model).__module__}, out)
""" % PROMPT


def hgscale(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hgscale", *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=240)


@pytest.fixture(scope="module")
def hf_dir(trained_checkpoint, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("hf") / "model"
    r = hgscale("export", "--checkpoint", str(trained_checkpoint), "--format", "hf", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_the_directory_is_a_transformers_model_with_our_code_in_one_file(hf_dir):
    files = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "modeling_hourglass.py", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "README.md"} <= files
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoConfig": "modeling_hourglass.HourglassConfig",
                               "AutoModelForCausalLM": "modeling_hourglass.HourglassForCausalLM"}
    assert cfg["model_type"] == "hourglass" and cfg["hierarchy"] == "1@1 2@2 1@1" and cfg["init_from"] == ""
    tree = ast.parse((hf_dir / "modeling_hourglass.py").read_text())
    # the file's imports (a function may still try an optional one, as the fused kernel tries triton on CUDA)
    roots = {(n.module or "").split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
    roots |= {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert roots - {"__future__"} <= {"dataclasses", "functools", "math", "re", "sys", "typing", "warnings",
                                      "torch", "transformers"}, roots


def test_transformers_alone_gives_hgscale_logits_and_generation(hf_dir, trained_checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "hf.pt"
    r = subprocess.run([sys.executable, "-c", ALONE, str(hf_dir), str(out)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=240, env={**env(), "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(out)
    assert got["type"].startswith("transformers_modules.")  # the exported file ran, not hgscale
    model, _ = load_any(trained_checkpoint)
    assert got["ids"][0].tolist() == list(PROMPT.encode())  # the tokenizer's ids are the bytes
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], model(got["x"]), rtol=0, atol=1e-5)
    want = generate(model, got["ids"], 60, temperature=0)
    assert torch.equal(got["greedy"], want)
    # hgscale sample, greedy, prints the same text token for token
    s = hgscale("sample", "--checkpoint", str(trained_checkpoint), "--prompt", PROMPT, "--tokens", "60",
                "--temperature", "0", "--no-track", "--out", str(tmp_path / "s.txt"))
    assert s.returncode == 0, s.stderr
    head, sampled = (tmp_path / "s.txt").read_text().rstrip("\n").split("\n", 1)
    assert head == "--- sample 0 ---"
    assert sampled == bytes(want[0].tolist()).decode("utf-8", errors="replace") == got["text"]
    assert got["pair"].shape == (2, len(PROMPT) + 12)


def test_hf_generate_is_cached_and_refuses_padding(hf_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True).eval()
    ids = torch.tensor([list(b"def f(x):\n    return ")])
    out = model.generate(ids, max_new_tokens=9, do_sample=False, return_dict_in_generate=True)
    cache = out.cache
    assert type(cache).__name__ == "HourglassCache" and cache.get_seq_length() == ids.shape[1] + 8
    with torch.no_grad():
        full = model(out.sequences[:, :-1]).logits[:, ids.shape[1] - 1:].argmax(-1)
    assert torch.equal(full, out.sequences[:, ids.shape[1]:])  # each token is the full forward's argmax
    with pytest.raises(ValueError, match="no attention mask"):
        model.generate(torch.cat([ids, ids]), attention_mask=torch.tensor([[0] + [1] * 19, [1] * 20]),
                       max_new_tokens=2)
    with pytest.raises(ValueError, match="exceed max_seq_len = 256"):
        model.generate(ids, max_new_tokens=300, do_sample=False)


def _image_dataset(tmp_path: Path) -> Path:
    """A tiny imagenet32-format dataset (npz batches of random pixels), prepared by our image pipeline."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    np.savez(src / "train_data_batch_1.npz", data=rng.integers(0, 256, (6, 3072), dtype=np.uint8),
             labels=np.ones(6, int))
    np.savez(src / "val_data.npz", data=rng.integers(0, 256, (2, 3072), dtype=np.uint8), labels=np.ones(2, int))
    subprocess.run([sys.executable, "-m", "data_pipelines.images", "imagenet32", "--source", str(src), "--out",
                    str(tmp_path / "img"), "--holdout", "2", "--no-progress"], cwd=ROOT, check=True, timeout=120)
    return tmp_path / "img"


@pytest.mark.parametrize("kinds", [["model.downsample=linear", "model.upsample=linear", "model.attention=rotary"],
                                   ["model.downsample=avg", "model.upsample=attention_linear",
                                    "model.init_layers=small_budget"]])
def test_image_models_and_other_resampling_export_exactly(tmp_path, kinds):
    from transformers import AutoModelForCausalLM

    from hgscale.checkpoint.hf.writer import export_hf

    data = _image_dataset(tmp_path)
    cfg = load_config(ROOT / "configs" / "test" / "tiny.json", [f"data.url={data}", "model.hierarchy=1@1 1@4 1@1",
                                                                  "model.dropout=0", *kinds])
    torch.manual_seed(1)
    model = HourglassLM(cfg.model, seed=5).eval()
    with torch.no_grad():  # away from the init: every weight matters to the comparison
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    src = tmp_path / "export"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(cfg.to_dict()))
    out = export_hf(src, tmp_path / "hf")
    assert not (out / "tokenizer.json").exists()  # pixels are their own ids
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    x = torch.randint(0, 256, (2, 3 * 32 + 5))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=0, atol=1e-5)
    greedy = hf.generate(x[:1, :41], max_new_tokens=30, do_sample=False)
    assert torch.equal(greedy, generate(model, x[:1, :41], 30, temperature=0))
    # a fresh model from the exported config draws hgscale's initial weights (model.init, model.init_layers)
    fresh = AutoModelForCausalLM.from_config(hf.config, trust_remote_code=True).model.state_dict()
    ours = HourglassLM(cfg.model).state_dict()
    assert fresh.keys() == ours.keys() and all(torch.equal(fresh[k], ours[k]) for k in ours)


def test_training_starts_from_an_export_in_either_format(hf_dir, trained_checkpoint, demo_data, tmp_path):  # noqa: F811
    """model.init_from: both export formats give the trained weights, bit for bit; a run started from one begins
    where the trained run ended, not where it began (same config, data and seed: only the weights differ)."""
    from hgscale.checkpoint.export import initial_weights

    ours = tmp_path / "ours"
    assert hgscale("export", "--checkpoint", str(trained_checkpoint), "--out", str(ours)).returncode == 0
    trained, _ = load_any(trained_checkpoint)
    model_cfg = load_config(ROOT / "configs" / "test" / "tiny.json", ["data.url=unused"]).model
    for path in (ours, hf_dir):
        model_cfg.init_from = str(path)
        got = initial_weights(model_cfg)
        assert got.keys() == trained.state_dict().keys()
        assert all(torch.equal(got[k], v) for k, v in trained.state_dict().items())
    cfg = tiny_config(tmp_path, demo_data, "hf.json", model={"init_from": str(hf_dir)}, train={"steps": 3})
    r = launch(1, TRAIN, ["--config", str(cfg)])
    assert f"starting from the weights of {hf_dir} (model.init_from)" in r.stdout + r.stderr
    losses = [m["train/loss"] for m in metrics(tmp_path / "hf_run") if "train/loss" in m]
    fresh = [m["train/loss"] for m in metrics(trained_checkpoint.parent / "config_run") if "train/loss" in m]
    assert len(losses) == 3 and losses[0] < fresh[0] - 0.05
    assert abs(losses[0] - fresh[-1]) < abs(fresh[0] - fresh[-1])


def test_init_from_a_different_model_fails_before_training(hf_dir, demo_data, tmp_path):  # noqa: F811
    cfg = tiny_config(tmp_path, demo_data, "bad.json", model={"init_from": str(hf_dir), "d_model": 64})
    r = subprocess.run([sys.executable, str(TRAIN), "--config", str(cfg)], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "is a different model: d_model 32 (ours 64)" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    cfg = tiny_config(tmp_path, demo_data, "none.json", model={"init_from": str(tmp_path / "nothing")})
    r = subprocess.run([sys.executable, str(TRAIN), "--config", str(cfg)], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "holds no model.safetensors" in r.stderr and "Traceback" not in r.stderr


def test_a_sentencepiece_model_ships_the_tokenizer_it_was_trained_with(tmp_path):
    """The exported AutoTokenizer encodes a text to the ids the dataset holds for it (lines one by one, <nl>
    between them), decodes them back, and generate() on those ids is hgscale's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_pipelines import text_sentencepiece
    from data_pipelines.tokenizers import decode_documents
    from hgscale.checkpoint.hf.writer import export_hf
    from hgscale.data.dataset import open_dataset

    lines = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # café {i}" for i in range(400)]
    (tmp_path / "docs.txt").write_text("\n\n".join(lines))
    text_sentencepiece.prepare([str(tmp_path / "docs.txt")], str(tmp_path / "sp"), vocab_size=300,
                               txt_document="blank-line")
    ds = open_dataset(load_config(ROOT / "configs" / "test" / "tiny.json", [f"data.url={tmp_path / 'sp'}"]).data)
    cfg = load_config(ROOT / "configs" / "test" / "tiny.json", [f"data.url={tmp_path / 'sp'}", "model.dropout=0",
                                                                  f"model.vocab_size={ds.vocab_size}"])
    model = HourglassLM(cfg.model, seed=2).eval()
    (tmp_path / "m").mkdir()
    save_file(model.state_dict(), str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg.to_dict()))
    out = export_hf(tmp_path / "m", tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    stream = ds.split_tokens("train").tolist()
    first = decode_documents((tmp_path / "sp" / "tokenizer.model").read_bytes(), stream)[0]
    ids = tok(first).input_ids
    assert ids == stream[:len(ids)] and stream[len(ids)] == tok.eos_token_id  # the document, then its end
    assert "\n" in first and tok.decode(ids) == first
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    prompt = torch.tensor([ids[:20]])
    assert torch.equal(hf.generate(prompt, max_new_tokens=15, do_sample=False), generate(model, prompt, 15, 0))
    # served as a registered model would be: text in, the completion's text out, through the same codec
    from mlflow.pyfunc import PythonModelContext

    from hgscale.checkpoint.pyfunc_model import HourglassPyfunc
    from hgscale.data.codec import Codec

    (tmp_path / "m" / "tokenizer.model").write_bytes((tmp_path / "sp" / "tokenizer.model").read_bytes())
    served = HourglassPyfunc()
    served.load_context(PythonModelContext(artifacts={"model": str(tmp_path / "m")}, model_config={"device": "cpu"}))
    codec = Codec("sentencepiece", (tmp_path / "sp" / "tokenizer.model").read_bytes())
    prompt = "def f1(x):"
    ids = codec.encode(prompt)
    want = codec.decode(generate(model, torch.tensor([ids]), 15, 0)[0, len(ids):].tolist())
    assert served.predict(None, [prompt], {"max_tokens": 15, "temperature": 0}) == [want]
