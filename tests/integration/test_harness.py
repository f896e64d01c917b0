"""`hgscale evaluate --harness`: lm-evaluation-harness tasks made from the demo corpus's test split (a perplexity task,
a four-way multiple choice, a generation task), offline, with the tiny trained model: rolling bits per byte equal
hgscale evaluate's sliding bpc on the same text, acc equals the choice of the best log-likelihood, generation is greedy
generation cut at the stop string, batches change no score, the scores reach the checkpoint's MLflow run, and bad
input is one line and USER_ERROR."""
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from data_pipelines.shards import DatasetWriter
from data_pipelines.tokenizers import DOC_END_BYTE
from hgscale.core.status import USER_ERROR
from tests.integration.train_helpers import ROOT, demo_data, env, trained_checkpoint  # noqa: F401

pytestmark = pytest.mark.integration

CHUNK, CTX = 64, 3  # the tiny model's max_seq_len is 256: windows of (3 + 1) x 64 tokens
ROLL, CHOICE, GEN, IMAGE = "hgscale_demo_rolling", "hgscale_demo_choice", "hgscale_demo_gen", "hgscale_demo_image"
LIMIT = 8


def corpus_docs(text: str) -> tuple[list[dict], list[dict], list[dict]]:
    """One document to roll; passages, each with its true 32-character continuation among 3 taken from elsewhere;
    passages to continue up to the end of their line."""
    roll = [{"text": text[:1500]}]
    choice = []
    for i in range(12):
        o = 1600 + 400 * i
        conts = [text[o + 160:o + 192]] + [text[o + 160 + 1000 * k + 37:o + 192 + 1000 * k + 37] for k in (1, 2, 3)]
        label = i % 4
        conts.insert(label, conts.pop(0))
        choice.append({"passage": text[o:o + 160], "choices": conts, "label": label})
    gen = [{"prompt": text[o:o + 120], "target": text[o + 120:].split("\n")[0]} for o in range(300, 300 + 8 * 500, 500)]
    return roll, choice, gen


def task_yaml(name: str, data: str, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n" + textwrap.dedent(body))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, demo_data):  # noqa: F811
    """Task YAML + jsonl in a directory for --harness-include; the corpus text; the rolled document."""
    from hgscale.config import DataConfig
    from hgscale.data import open_dataset

    out = tmp_path_factory.mktemp("harness_tasks")
    text = bytes(open_dataset(DataConfig(url=str(demo_data))).split_tokens("test").tolist()).decode("utf-8", "ignore")
    roll, choice, gen = corpus_docs(text)
    for name, docs in (("roll", roll), ("choice", choice), ("gen", gen), ("image", choice[:2])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / "roll.yaml").write_text(task_yaml(ROLL, out / "roll.jsonl", """
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: text
        metric_list:
          - metric: bits_per_byte
          - metric: byte_perplexity
        """))
    (out / "choice.yaml").write_text(task_yaml(CHOICE, out / "choice.jsonl", """
        output_type: multiple_choice
        doc_to_text: passage
        doc_to_choice: choices
        doc_to_target: label
        target_delimiter: ""
        metric_list:
          - metric: acc
        """))
    (out / "gen.yaml").write_text(task_yaml(GEN, out / "gen.jsonl", """
        output_type: generate_until
        doc_to_text: prompt
        doc_to_target: target
        target_delimiter: ""
        generation_kwargs:
          until: ["\\n", ". "]
          max_gen_toks: 24
          do_sample: false
        metric_list:
          - metric: exact_match
        """))
    (out / "image.yaml").write_text(task_yaml(IMAGE, out / "image.jsonl", """
        output_type: multiple_choice
        doc_to_text: passage
        doc_to_image: passage
        doc_to_choice: choices
        doc_to_target: label
        """))
    return {"dir": out, "text": text, "roll": roll[0]["text"], "choice": choice}


def offline_env(tmp) -> dict:
    e = env()
    e.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf"), TOKENIZERS_PARALLELISM="false")
    return e


def hgscale(tmp, *args: str, pre: str = "") -> subprocess.CompletedProcess:
    """``hgscale ARGS`` in a fresh process, offline, run from ``tmp`` (lm_eval records the working directory's git
    commit); ``pre`` runs first in that process."""
    code = f"import sys\n{pre}\nfrom hgscale.commands import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=tmp, env=offline_env(tmp), capture_output=True,
                          text=True, timeout=240)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_checkpoint):  # noqa: F811
    """The tiny model exported, linked (run.json) to a fresh MLflow run in a SQLite store."""
    from mlflow.tracking import MlflowClient

    from hgscale.checkpoint.export import export
    from hgscale.checkpoint.run_link import CheckpointRun, save_run_file

    tmp = tmp_path_factory.mktemp("harness_export")
    out = export(trained_checkpoint, tmp / "model")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("hgscale"))
    save_run_file(CheckpointRun(run.info.run_id, 8, uri), out)
    return {"dir": out, "uri": uri, "run_id": run.info.run_id}


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory, tasks, exported):
    """One end-to-end ``hgscale evaluate --harness`` of the three tasks: (its JSON, its stdout)."""
    tmp = tmp_path_factory.mktemp("harness_run")
    r = hgscale(tmp, "evaluate", "--checkpoint", str(exported["dir"]), "--harness", f"{ROLL},{CHOICE},{GEN}",
                "--harness-include", str(tasks["dir"]), "--limit", str(LIMIT), "--batch-size", "5", "--chunk",
                str(CHUNK), "--context-chunks", str(CTX), "--device", "cpu", "--json", str(tmp / "out.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp / "out.json").read_text())["results"], r.stdout


@pytest.fixture(scope="module")
def text_lm(exported):
    from hgscale.evaluation.textlm import TextLM

    return TextLM.load(str(exported["dir"]), "cpu", batch_size=5, chunk=CHUNK, context_chunks=CTX)


def test_rolling_bits_per_byte_equal_hgscale_evaluate_bpc_on_the_same_text(tmp_path, tasks, exported, harness_run,
                                                                           text_lm):
    from hgscale.models.scoring import sliding_nll

    bpb = harness_run[0][ROLL]["bits_per_byte,none"]
    # the document is the stream [end of the previous document] + its bytes: sliding_nll on it, here ...
    stream = np.frombuffer(bytes([DOC_END_BYTE]) + tasks["roll"].encode(), np.uint8)
    nats, n = sliding_nll(text_lm.model, torch.from_numpy(stream.astype(np.int64)), CHUNK, CTX)
    assert n == len(tasks["roll"].encode()) == 1500
    assert bpb == pytest.approx(nats / n / math.log(2), abs=1e-4)
    # ... and hgscale evaluate's sliding protocol on a dataset whose test split is that stream
    with DatasetWriter(str(tmp_path / "data"), name="roll", modality="text_bytes", vocab_size=256) as w:
        w.write_stream("test", stream)
    r = hgscale(tmp_path, "evaluate", "--checkpoint", str(exported["dir"]), "--data-url", str(tmp_path / "data"),
                "--protocol", "sliding", "--chunk", str(CHUNK), "--context-chunks", str(CTX), "--no-track",
                "--json", str(tmp_path / "split.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    split = json.loads((tmp_path / "split.json").read_text())
    assert split["tokens"] == 1500 and split["metric"] == "bpc"
    assert bpb == pytest.approx(split["value"], abs=1e-4)
    assert 3.0 < bpb < 8.5  # 8 training steps from a uniform 8 bits


def test_multiple_choice_acc_is_the_best_loglikelihood_over_the_same_docs(tasks, harness_run, text_lm):
    acc = harness_run[0][CHOICE]["acc,none"]
    docs = tasks["choice"][:LIMIT]
    scores = [text_lm.loglikelihood([(d["passage"], c) for c in d["choices"]]) for d in docs]
    by_hand = sum(int(np.argmax([s for s, _ in sc])) == d["label"] for sc, d in zip(scores, docs, strict=True))
    assert 0.0 <= acc <= 1.0
    assert acc == pytest.approx(by_hand / LIMIT, abs=1e-9)
    assert harness_run[0][CHOICE]["acc_stderr,none"] > 0  # lm_eval saw LIMIT scored docs, not one
    assert 0.0 <= harness_run[0][GEN]["exact_match,none"] <= 1.0
    assert f"|{CHOICE}" in harness_run[1]  # the table on stdout


def test_harness_scores_go_into_the_checkpoints_run(exported, harness_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=exported["uri"])
    logged = client.get_run(exported["run_id"]).data.metrics
    assert logged[f"harness/{CHOICE}/acc"] == pytest.approx(harness_run[0][CHOICE]["acc,none"])
    assert logged[f"harness/{ROLL}/bits_per_byte"] == pytest.approx(harness_run[0][ROLL]["bits_per_byte,none"])
    hist = client.get_metric_history(exported["run_id"], f"harness/{GEN}/exact_match")
    assert [m.step for m in hist] == [8]  # the checkpoint's step, as test/bpc is logged
    assert f"to MLflow run {exported['run_id']} at step 8" in harness_run[1]


def test_generate_until_is_greedy_generation_cut_at_until(text_lm):
    from lm_eval.api.instance import Instance

    from hgscale.evaluation.harness import HgscaleLM
    from hgscale.models.generation import generate

    lm = HgscaleLM(text_lm=text_lm)
    a = {"until": ["e"], "max_gen_toks": 30}
    prompts = ["The with statement", "class C:\n    def", "The for statement.", "The with statement"]
    kwargs = [a, {"until": "(", "max_gen_toks": 30}, a, {**a, "do_sample": False, "temperature": 0.7}]
    reqs = [Instance("generate_until", {}, (p, k), i) for i, (p, k) in enumerate(zip(prompts, kwargs, strict=True))]
    got = lm.generate_until(reqs)  # requests 0 and 2: one setting, one length, so one batch
    for p, k, text in zip(prompts, kwargs, got, strict=True):
        full = generate(text_lm.model, torch.tensor([list(p.encode())]), 30, temperature=0)[0, len(p.encode()):]
        stop = k["until"] if isinstance(k["until"], str) else k["until"][0]
        assert text == bytes(full.tolist()).decode("utf-8", "replace").split(stop)[0]
    assert got[3] == got[0]  # a temperature without do_sample stays greedy, as lm_eval's hf model


def test_batched_and_single_loglikelihood_agree(tasks, exported):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    import hgscale.evaluation.harness  # noqa: F401 - registers the "hgscale" model with lm_eval

    # built as lm_eval builds a model from --model hgscale --model_args ...
    lm = get_model("hgscale").create_from_arg_string(f"checkpoint={exported['dir']},chunk={CHUNK},context_chunks={CTX}",
                                                     {"batch_size": 5, "device": "cpu"})
    assert (lm.batch_size, lm.lm.chunk, lm.lm.context_chunks) == (5, CHUNK, CTX)
    # requests of many lengths, one context past max_seq_len
    pairs = [(d["passage"], c) for d in tasks["choice"][:3] for c in d["choices"]] + [(tasks["roll"], " the")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    batched = lm.loglikelihood(reqs)
    single = [lm.loglikelihood([r])[0] for r in reqs]
    assert len({round(s, 3) for s, _ in batched}) > len(pairs) // 2  # distinct scores: the comparison means something
    for (b, bg), (s, sg) in zip(batched, single, strict=True):
        assert b == pytest.approx(s, abs=1e-5) and bg == sg


def error_line(rc: int, stderr: str) -> str:
    assert rc == USER_ERROR, (rc, stderr[-2000:])
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def test_unknown_tasks_multimodal_tasks_and_a_missing_lm_eval_are_one_line_and_user_error(tmp_path, tasks, exported):
    ckpt, inc = str(exported["dir"]), str(tasks["dir"])
    r = hgscale(tmp_path, "evaluate", "--checkpoint", ckpt, "--harness", f"{CHOICE},hgscale_no_task",
                "--harness-include", inc)
    line = error_line(r.returncode, r.stderr)
    assert "unknown harness task 'hgscale_no_task'" in line and "--harness-include DIR" in line
    assert os.path.join("lm_eval", "tasks") in line and inc in line  # where tasks are looked for
    r = hgscale(tmp_path, "evaluate", "--checkpoint", ckpt, "--harness", IMAGE, "--harness-include", inc)
    assert f"harness task {IMAGE!r} needs multimodal input" in error_line(r.returncode, r.stderr)
    r = hgscale(tmp_path, "evaluate", "--checkpoint", ckpt, "--harness", CHOICE,
                pre="sys.modules['lm_eval'] = None  # what import finds when lm_eval is not installed")
    line = error_line(r.returncode, r.stderr)
    assert "lm-evaluation-harness" in line and 'pip install -e ".[hf]"' in line


def test_an_image_model_is_one_line_and_user_error(tmp_path, tasks, exported, capsys):
    from hgscale.commands.evaluate import main

    with DatasetWriter(str(tmp_path / "images"), name="img", modality="image", vocab_size=256,
                       extra={"sample_tokens": 12}) as w:
        w.add("test", np.arange(12, dtype=np.uint8), label=0)
    rc = main(["--checkpoint", str(exported["dir"]), "--harness", CHOICE, "--harness-include", str(tasks["dir"]),
               "--data-url", str(tmp_path / "images")])
    assert "this model was trained on image data" in error_line(rc, capsys.readouterr().err)
