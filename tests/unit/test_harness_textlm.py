"""The text-model pieces behind the lm-evaluation-harness adapter, on a small random model: the sliding windows shared
with hgscale evaluate, continuation scores against a plain forward, generation against hgscale.models.generation,
tokenizers (bytes, the dataset's SentencePiece model) and the checks of a model's dataset. No lm_eval here."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipelines.shards import DatasetWriter
from data_pipelines.tokenizers import DOC_END_BYTE, SentencePieceTokenizer, decode_documents, train_sentencepiece
from hgscale.config import config_from_dict
from hgscale.data.codec import Codec
from hgscale.evaluation.textlm import HarnessError, TextLM, cut, open_codec
from hgscale.models import HourglassLM
from hgscale.models.generation import generate
from hgscale.models.scoring import sliding_nll, sliding_nll_docs, sliding_windows
from hgscale.tracking.names import harness_metric

CFG = {"model": {"size": "debug", "hierarchy": "1@1 1@2 1@1", "max_seq_len": 64}, "data": {"url": "x", "seq_len": 16}}
TEXT = ("The with statement is used to wrap the execution of a block with methods defined by a context manager. "
        "This allows common try/except/finally usage patterns to be encapsulated for convenient reuse.\n")


@pytest.fixture(scope="module")
def lm():
    cfg = config_from_dict(CFG)
    torch.manual_seed(0)
    model = HourglassLM(cfg.model, seed=7).eval()
    with torch.no_grad():  # a random init predicts nearly uniformly; larger weights give distinct scores
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return TextLM(model, cfg, Codec("bytes"), batch_size=3, chunk=16, context_chunks=2)


def test_sliding_windows_target_every_token_but_the_first_once_within_the_window():
    for n, chunk, ctx in ((1, 4, 2), (2, 4, 2), (37, 4, 2), (64, 16, 3), (65, 16, 0)):
        wins = sliding_windows(n, chunk, ctx)
        targets = [t for _, s, e in wins for t in range(s, e)]
        assert targets == list(range(1, n))
        assert all(e - 1 - a <= (ctx + 1) * chunk and a == max(0, s - 1 - ctx * chunk) for a, s, e in wins)
    assert len(sliding_windows(100, 8, 1, max_chunks=3)) == 3


def test_documents_scored_together_equal_each_scored_alone(lm):
    docs = [torch.randint(0, 256, (n,)) for n in (5, 70, 33, 1)]
    together = sliding_nll_docs(lm.model, docs, chunk=16, context_chunks=2, batch_size=4)
    for doc, (nats, count) in zip(docs, together, strict=True):
        alone = sliding_nll(lm.model, doc, chunk=16, context_chunks=2, batch_size=1)
        assert count == alone[1] == len(doc) - 1
        assert nats == pytest.approx(alone[0], rel=1e-5, abs=1e-5)


def test_rolling_scores_the_document_after_its_start_token_with_the_sliding_windows(lm):
    texts = [TEXT, TEXT[:10], ""]
    got = lm.rolling(texts)
    for text, (logp, n) in zip(texts, got, strict=True):
        want, count = sliding_nll(lm.model, torch.tensor([DOC_END_BYTE, *text.encode()]), 16, 2)
        assert n == count == len(text.encode())
        assert logp == pytest.approx(-want, rel=1e-5, abs=1e-5)
    assert got[2] == (0.0, 0)


def reference_loglikelihood(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """The continuation's log-probability from one unpadded forward of context + continuation."""
    seq = torch.tensor(ctx + cont)
    with torch.no_grad():
        logp = F.log_softmax(model(seq[None, :-1])[0].float(), -1)[len(ctx) - 1:]
    want = torch.tensor(cont)
    return float(logp.gather(1, want[:, None]).sum()), bool((logp.argmax(-1) == want).all())


def test_loglikelihood_matches_a_plain_forward_batched_or_not(lm):
    pairs = [("The with", " statement"), ("", "The"), ("a  ", "b"), (TEXT[:30], TEXT[30:41]), ("x", "")]
    batched = lm.loglikelihood(pairs)
    one = [lm.loglikelihood([p])[0] for p in pairs]
    for (c, x), got, single in zip(pairs, batched, one, strict=True):
        assert got[0] == pytest.approx(single[0], abs=1e-5) and got[1] == single[1]
        # trailing spaces of the context move into the continuation; an empty context is the document start
        c2, x2 = (c.rstrip(), c[len(c.rstrip()):] + x)
        want = reference_loglikelihood(lm.model, list(c2.encode()) or [DOC_END_BYTE], list(x2.encode())) if x2 \
            else (0.0, True)
        assert got[0] == pytest.approx(want[0], abs=1e-4) and got[1] == want[1]
    assert batched[4] == (0.0, True)


def test_a_context_longer_than_the_model_is_left_truncated(lm):
    long_ctx, cont = (TEXT * 2).rstrip(), " done"
    got = lm.loglikelihood([(long_ctx, cont)])[0]
    keep = (long_ctx + cont).encode()[-(64 + 1):]  # max_seq_len inputs + the last target
    want = reference_loglikelihood(lm.model, list(keep[:-len(cont)]), list(cont.encode()))
    assert got[0] == pytest.approx(want[0], abs=1e-4)
    with pytest.raises(HarnessError, match="continuation of 70 tokens does not fit model.max_seq_len = 64"):
        lm.loglikelihood([("a", "b" * 70)])


def test_generate_is_greedy_generation_cut_at_the_first_until_string(lm):
    contexts = ["The with", "The for", "def f(", ""]
    out = lm.generate(contexts, until=["e", "\n\n"], max_tokens=20)
    for ctx, text in zip(contexts, out, strict=True):
        ids = list(ctx.encode()) or [DOC_END_BYTE]
        full = generate(lm.model, torch.tensor([ids]), 20, temperature=0)[0, len(ids):].tolist()
        new = bytes(full[:full.index(DOC_END_BYTE)] if DOC_END_BYTE in full else full).decode("utf-8", "replace")
        assert text == cut(new, ["e", "\n\n"])
        assert "e" not in text
    assert cut("abcabc", ["c", "b"]) == "a" and cut("abc", []) == "abc" and cut("abc", [""]) == "abc"


def test_windows_must_fit_the_model():
    cfg = config_from_dict(CFG)
    model = HourglassLM(cfg.model, seed=1).eval()
    assert TextLM(model, cfg, Codec("bytes"), chunk=16).context_chunks == 3  # 64 // 16 - 1
    with pytest.raises(HarnessError, match=r"\(4 \+ 1\) x 16 tokens exceeds model.max_seq_len = 64"):
        TextLM(model, cfg, Codec("bytes"), chunk=16, context_chunks=4)


def test_sentencepiece_codec_reads_text_as_the_data_pipeline_wrote_it():
    # byte fallback takes 256 pieces of the vocabulary
    spm = train_sentencepiece(TEXT.split(". ") * 30, vocab_size=400, model_type="unigram", threads=1)
    codec = Codec("sentencepiece", spm)
    text = "The with statement\nis used."
    ids = codec.encode(text)
    assert ids + [codec.eot] == SentencePieceTokenizer(spm).encode([text], [text.encode()]).tolist()
    assert codec.decode(ids) == text == decode_documents(spm, ids)[0]
    assert codec.decode(ids + [codec.eot] + ids) == text  # a generated document ends at its end token
    assert codec.decode([]) == ""


def write_dataset(url, modality: str, vocab: int = 256, tokenizer: bytes | None = None):
    extra = {"sample_tokens": 4} if modality == "image" else {}
    with DatasetWriter(str(url), name="t", modality=modality, vocab_size=vocab, extra=extra,
                       tokenizer="tokenizer.model" if tokenizer else None) as w:
        w.add("test", np.arange(8, dtype=np.uint8 if vocab <= 256 else np.uint16))
        if tokenizer:
            w.put_file("tokenizer.model", tokenizer)


def test_the_models_dataset_decides_the_tokenizer(tmp_path, caplog):
    cfg = config_from_dict(CFG)
    write_dataset(tmp_path / "img", "image")
    with pytest.raises(HarnessError, match="trained on image data"):
        open_codec(cfg, str(tmp_path / "img"))
    write_dataset(tmp_path / "txt", "text_bytes")
    assert open_codec(cfg, str(tmp_path / "txt")) == Codec("bytes")
    with caplog.at_level("WARNING", logger="hgscale.evaluation"):  # no dataset: a byte model reads UTF-8
        assert open_codec(cfg, str(tmp_path / "nowhere")).kind == "bytes"
    assert "cannot be opened" in caplog.text
    cfg.model.vocab_size = 400
    with pytest.raises(HarnessError, match="vocabulary .400 tokens. is not bytes.*pass --data-url"):
        open_codec(cfg, str(tmp_path / "nowhere"))
    spm = train_sentencepiece([TEXT] * 30, vocab_size=400, model_type="unigram", threads=1)
    write_dataset(tmp_path / "sp", "text_sentencepiece", vocab=400, tokenizer=spm)
    codec = open_codec(cfg, str(tmp_path / "sp"))
    assert codec.kind == "sentencepiece" and codec.decode(codec.encode("The with")) == "The with"


def test_harness_metric_names():
    assert harness_metric("hellaswag", "acc,none") == "harness/hellaswag/acc"
    assert harness_metric("gsm8k", "exact_match,strict-match") == "harness/gsm8k/exact_match/strict-match"
    assert harness_metric("wiki(2)", "bits_per_byte_stderr,none") == "harness/wiki_2_/bits_per_byte_stderr"


def test_lm_eval_and_transformers_are_imported_only_on_the_harness_path():
    code = ("import sys\n"
            "import hgscale.evaluation, hgscale.evaluation.splits, hgscale.evaluation.textlm\n"
            "import hgscale.commands.evaluate, hgscale.training.trainer\n"
            "seen = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'lm_eval', 'transformers'})\n"
            "print(seen())\n"
            "import hgscale.evaluation.harness\n"
            "print(seen())\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:2] == ["[]", "['lm_eval']"]
