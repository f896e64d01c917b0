"""A trained HourglassLM as a text model on one device: text in, log-likelihoods and generated text out. The
lm-evaluation-harness adapter (:mod:`.harness`) calls these; nothing here imports lm_eval.

    lm = TextLM.load("runs/demo/checkpoints")                # a training checkpoint or an exported directory
    lm.loglikelihood([("The with", " statement")])           # [(log-probability, greedy?)]
    lm.rolling(["a whole document"])                          # [(log-probability, scored tokens)]
    lm.generate(["def f("], until=["\\n"], max_tokens=64)     # ["x):"]

Tokens: byte-level models (vocabulary 256) read UTF-8 bytes; models trained on a SentencePiece dataset read it
with the dataset's own tokenizer (``tokenizer.model`` beside its manifest), through the data pipeline's encoder,
so text is tokenized exactly as in training. A document starts after the end-of-document token of the data
pipeline (byte 0x03, or SentencePiece's ``</s>``), as every document but the first does in a prepared text stream.
"""
from __future__ import annotations

import logging

import torch

from hgscale.core.status import UserError
from hgscale.data.codec import Codec
from hgscale.models.generation import generate
from hgscale.models.scoring import default_context_chunks, sliding_nll_docs

log = logging.getLogger("hgscale.evaluation")


class HarnessError(UserError):
    """Input the harness path cannot serve; the message names the value and the fix."""


def open_codec(cfg, data_url: str | None = None) -> Codec:
    """The codec of a model from its dataset's manifest (modality, tokenizer); an image model is refused. A byte-level
    model whose dataset cannot be opened is read as UTF-8 text, with a warning."""
    from hgscale.data import open_dataset
    from hgscale.data.io import read_bytes, storage_options

    if data_url:
        cfg.data.url = data_url
    V = cfg.model.vocab_size
    try:
        ds = open_dataset(cfg.data)
    except Exception as e:  # noqa: BLE001 - DataError, StorageError, a missing manifest: all mean "not reachable"
        if V != 256:
            raise HarnessError(f"this model's vocabulary ({V} tokens) is not bytes; its tokenizer lives with its "
                               f"dataset {cfg.data.url!r}, which cannot be opened ({str(e).splitlines()[0]}); pass "
                               f"--data-url DIR of the prepared dataset") from None
        log.warning("dataset %r cannot be opened, so its modality is unknown: reading this 256-token model as "
                    "byte-level text (pass --data-url to check)", cfg.data.url)
        return Codec("bytes")
    if ds.modality == "image":
        raise HarnessError(f"--harness evaluates text models, and this model was trained on image data "
                           f"({ds.root}): lm-evaluation-harness tasks are text; score images with hgscale evaluate "
                           f"--split test (bits per dimension)")
    if ds.modality == "text_bytes":
        return Codec("bytes")
    if not ds.tokenizer_url:
        raise HarnessError(f"dataset {ds.root} is SentencePiece text but names no tokenizer in its manifest")
    codec = Codec("sentencepiece", read_bytes(ds.tokenizer_url, getattr(ds, "opts", None) or
                                              storage_options(cfg.data)))
    if codec.vocab_size > V:
        raise HarnessError(f"the tokenizer of {ds.root} has {codec.vocab_size} pieces but the model only "
                           f"{V} (model.vocab_size): the dataset is not the one this model was trained on")
    return codec


class _Finished(Exception):
    """Raised from the per-token callback once every row has ended: generate knows one stop token, an ``until``
    string may span several."""


class _Watch:
    """Collects each row's new tokens during generate and ends it when every row holds eot or an until string."""

    def __init__(self, codec: Codec, rows: int, until: list[str]):
        self.codec, self.until = codec, [u for u in until if u]
        self.new: list[list[int]] = [[] for _ in range(rows)]
        self.done = [False] * rows

    def __call__(self, ids: torch.Tensor) -> None:
        for r, t in enumerate(ids.tolist()):
            if not self.done[r]:
                self.new[r].append(t)
                self.done[r] = t == self.codec.eot or any(u in self.codec.decode(self.new[r]) for u in self.until)
        if all(self.done):
            raise _Finished


class TextLM:
    """Scoring and generation with one model: every request in batches of ``batch_size``; rolling scores use the
    sliding protocol of ``hgscale evaluate`` (``chunk`` tokens per window after ``context_chunks`` chunks)."""

    def __init__(self, model, cfg, codec: Codec, device="cpu", batch_size: int = 8, chunk: int = 128,
                 context_chunks: int | None = None, seed: int = 1234):
        self.model, self.cfg, self.codec, self.device = model.eval(), cfg, codec, torch.device(device)
        self.max_len = cfg.model.max_seq_len
        if batch_size < 1 or chunk < 1:
            raise HarnessError(f"batch size {batch_size} and chunk {chunk} must be >= 1")
        self.batch_size, self.chunk = int(batch_size), int(chunk)
        self.context_chunks = default_context_chunks(self.max_len, chunk) if context_chunks is None else context_chunks
        if (self.context_chunks + 1) * chunk > self.max_len:
            raise HarnessError(f"a window of ({self.context_chunks} + 1) x {chunk} tokens exceeds model.max_seq_len = "
                               f"{self.max_len}; lower --context-chunks or --chunk")
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    @classmethod
    def load(cls, checkpoint: str, device="cpu", data_url: str | None = None, **kw) -> TextLM:
        from hgscale.checkpoint.export import load_any

        model, cfg = load_any(checkpoint, device)
        return cls(model, cfg, open_codec(cfg, data_url), device, **kw)

    # ------------------------------------------------------------------------------------ scoring
    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation) as the harness splits them: trailing spaces of the context move to
        the continuation, and the continuation's ids are those the whole text has after the context's (a tokenizer
        may merge across the boundary); an empty context is the document start, eot."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.codec.encode(context + continuation), self.codec.encode(context)
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else self.codec.encode(continuation)
        return ctx or [self.codec.eot], cont

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(log-probability of each continuation after its context, whether greedy decoding yields it). A context
        longer than model.max_seq_len is left-truncated; the batch is ordered longest first."""
        encoded = [self._pair(c, x) for c, x in pairs]
        for _, cont in encoded:
            if len(cont) > self.max_len:
                raise HarnessError(f"a continuation of {len(cont)} tokens does not fit model.max_seq_len = "
                                   f"{self.max_len}")
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]) - len(encoded[i][1]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(encoded)
        for k in range(0, len(order), self.batch_size):
            group = order[k:k + self.batch_size]
            for i, res in zip(group, self._score_pairs([encoded[i] for i in group]), strict=True):
                out[i] = res
        return out

    @torch.no_grad()
    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        rows = [(ctx + cont)[-(self.max_len + 1):] for ctx, cont in pairs]  # left-truncated: inputs <= max_len
        L = max(len(r) - 1 for r in rows)
        inp = torch.zeros(len(rows), max(L, 1), dtype=torch.long)
        for i, r in enumerate(rows):
            inp[i, :len(r) - 1] = torch.tensor(r[:-1])
        logits = self.model(inp.to(self.device))  # (B, L, V)
        out = []
        for i, ((_, cont), r) in enumerate(zip(pairs, rows, strict=True)):
            n = len(cont)
            if n == 0:
                out.append((0.0, True))
                continue
            # the positions that predict the continuation
            lp = logits[i, len(r) - 1 - n:len(r) - 1].float().log_softmax(-1).cpu()
            want = torch.tensor(cont)
            out.append((float(lp.gather(1, want[:, None]).sum()), bool((lp.argmax(-1) == want).all())))
        return out

    def rolling(self, texts: list[str]) -> list[tuple[float, int]]:
        """(log-probability, tokens) of each whole text after the document start: the windows of hgscale evaluate's
        sliding protocol (hgscale.models.scoring) over [eot] + tokens, so every token is scored exactly once."""
        docs = [torch.tensor([self.codec.eot, *self.codec.encode(t)], dtype=torch.long) for t in texts]
        scored = sliding_nll_docs(self.model, docs, self.chunk, self.context_chunks, self.batch_size,
                                  device=self.device)
        return [(-nats, n) for nats, n in scored]

    # --------------------------------------------------------------------------------- generation
    def generate(self, contexts: list[str], until: list[str], max_tokens: int = 256,
                 temperature: float = 0.0) -> list[str]:
        """The text generated after each context (temperature 0: greedy), cut before the first ``until`` string
        or the end of the document. Contexts of one token length form batches (the model takes no padding mask);
        a context longer than model.max_seq_len is left-truncated."""
        prompts = [(self.codec.encode(c) or [self.codec.eot])[-self.max_len:] for c in contexts]
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_len.setdefault(len(p), []).append(i)
        out = [""] * len(prompts)
        for idx in by_len.values():
            for k in range(0, len(idx), self.batch_size):
                group = idx[k:k + self.batch_size]
                texts = self._generate([prompts[i] for i in group], until, max_tokens, temperature)
                for i, text in zip(group, texts, strict=True):
                    out[i] = text
        return out

    def _generate(self, prompts: list[list[int]], until: list[str], max_tokens: int, temperature: float) -> list[str]:
        prompt = torch.tensor(prompts, dtype=torch.long, device=self.device)
        try:
            return self._sample(prompt, until, max_tokens, temperature, use_cache=True)
        except NotImplementedError:  # no exact decoding cache (LSH attention): the same windows, full forwards
            return self._sample(prompt, until, max_tokens, temperature, use_cache=False)

    def _sample(self, prompt: torch.Tensor, until: list[str], max_tokens: int, temperature: float,
                use_cache: bool) -> list[str]:
        watch = _Watch(self.codec, len(prompt), until)
        try:
            generate(self.model, prompt, max_tokens, temperature, generator=self.generator, on_token=watch,
                     use_cache=use_cache)
        except _Finished:
            pass
        return [cut(self.codec.decode(new), until) for new in watch.new]

def cut(text: str, until: list[str]) -> str:
    """``text`` before the first occurrence of any ``until`` string."""
    ends = [text.find(u) for u in until if u and u in text]
    return text[:min(ends)] if ends else text
