"""Sampling from a model on one device with the incremental decoding cache: logit filters, the sampling loop and
a streamer that prints tokens as they come.

    out = generate(model, prompt, n_tokens=200, temperature=0.8, top_p=0.9, on_token=Streamer(sys.stdout, True))

A context longer than model.max_seq_len is handled by a sliding re-prefill: when the sequence outgrows the
window, the cache restarts from its last ``max_seq_len // 2`` tokens (``use_cache=False`` recomputes with the
same windows, a full forward per token).

``GraphStep`` (opt-in, CUDA only, not used by ``generate``) replays the one-token decoding step as CUDA graphs.
"""
from __future__ import annotations

import codecs
from typing import Callable, TextIO

import torch

from hgscale.models.decode import DecodeCache, _check_tokens, _step


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) -> the same with -inf outside the k most likely tokens and outside the nucleus: the smallest
    set of most likely tokens whose probability reaches top_p (the most likely token is always kept)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = logits.sort(dim=-1, descending=True)
        p = srt.softmax(-1)
        drop_sorted = (p.cumsum(-1) - p) >= top_p  # the mass before this token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) token ids; temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


def _check_args(model, prompt: torch.Tensor, n_tokens: int, temperature: float, top_k: int, top_p: float,
                stop: int | None) -> None:
    V = model.cfg.vocab_size
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or min(prompt.shape) < 1 or prompt.dtype != torch.long:
        got = f"{prompt.dtype} {tuple(prompt.shape)}" if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise ValueError(f"prompt must be a LongTensor (batch >= 1, length >= 1); got {got}")
    lo, hi = int(prompt.min()), int(prompt.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"prompt id {lo if lo < 0 else hi} is outside the vocabulary: prompt ids must lie in "
                         f"[0, {V}) (model.vocab_size)")
    problems = [f"n_tokens = {n_tokens} must be >= 0" if n_tokens < 0 else "",
                f"temperature = {temperature} must be >= 0 (0 = greedy)" if temperature < 0 else "",
                f"top_k = {top_k} must be >= 0 (0 = all tokens)" if top_k < 0 else "",
                f"top_p = {top_p} must be in (0, 1]" if not 0 < top_p <= 1 else "",
                f"stop = {stop} must lie in [0, {V})" if stop is not None and not 0 <= stop < V else ""]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError("; ".join(problems))


@torch.no_grad()
def generate(model, prompt: torch.Tensor, n_tokens: int, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None, *, top_p: float = 1.0, stop: int | None = None,
             use_cache: bool = True, on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """prompt (B, T0) long -> (B, T0 + n), n <= n_tokens: fewer once every row has produced ``stop`` (a row
    that stopped earlier is padded with ``stop``). ``on_token((B,) ids)`` is called after each step.

    use_cache: model.decode with one cache per window (one token of work per step); False: a full forward
    over the window per step (the reference). Both use the same windows: the last <= max_seq_len tokens,
    restarted from the last max_seq_len // 2 tokens whenever the sequence outgrows the window."""
    _check_args(model, prompt, n_tokens, temperature, top_k, top_p, stop)
    model.eval()  # dropout off: sampling is inference, and decode refuses training mode
    L = model.cfg.max_seq_len
    B, T0 = prompt.shape
    start = max(0, T0 - L)  # first token of the window
    out, cache = prompt, None
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    for step in range(n_tokens):
        if out.shape[1] - start > L:
            start, cache = out.shape[1] - max(1, L // 2), None  # slide: re-prefill the newer half
        if not use_cache:
            logits = model(out[:, start:])[:, -1]
        elif cache is None:
            cache = model.init_cache(B, max_len=min(L, out.shape[1] - start + n_tokens - step))
            logits = model.decode(out[:, start:], cache)[:, -1]
        else:
            logits = model.decode(out[:, -1:], cache)[:, -1]
        nxt = next_token(logits.float(), temperature, top_k, top_p, generator)  # (B, 1)
        if stop is not None:
            nxt = nxt.masked_fill(done[:, None], stop)
            done |= nxt[:, 0] == stop
        out = torch.cat([out, nxt], dim=1)
        if on_token is not None:
            on_token(nxt[:, 0])
        if stop is not None and bool(done.all()):
            break
    return out


class Streamer:
    """Writes the new tokens of row 0 to a text stream as they come (UTF-8 decoded incrementally)."""

    def __init__(self, stream: TextIO, as_bytes: bool):
        self.stream, self.as_bytes, self.first = stream, as_bytes, True
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, ids: torch.Tensor) -> None:
        t = int(ids[0])
        text = self.dec.decode(bytes([t])) if self.as_bytes else ("" if self.first else ",") + str(t)
        self.first = False
        if text:
            self.stream.write(text)
            self.stream.flush()

    def close(self) -> None:
        self.stream.write((self.dec.decode(b"", final=True) if self.as_bytes else "") + "\n")
        self.stream.flush()


def sample_text(row: list[int], n_prompt: int, prompt: str, stop: int | None, as_bytes: bool) -> str:
    """One generated row -> its text: the prompt and the new bytes (byte-level) or the new ids, cut after
    the first stop token (generate pads a stopped row with it)."""
    new = row[n_prompt:]
    if stop is not None and stop in new:
        new = new[: new.index(stop) + 1]
    return prompt + bytes(new).decode("utf-8", errors="replace") if as_bytes else ",".join(map(str, new))


class GraphStep:
    """One-token decoding steps of ``cache`` replayed as CUDA graphs: a step of a small model is hundreds of
    kernel launches, each costing more than its arithmetic; a graph launches them all at once.

        logits = model.decode(prompt, cache)            # the prompt, as usual (any length >= 1)
        step = GraphStep(model, cache)                  # opt-in; nothing else uses it
        logits = step(next_tokens)                      # (B, 1) -> (B, 1, V), as model.decode(next_tokens, cache)

    UNTESTED on a GPU: no GPU has run it yet (BENCHMARKS.md says so until one does). What the graphs
    replay is decode._step in static mode (cached_attention.attend_static: attention over the whole
    buffer with a mask, rows written and table columns gathered at positions held in a device tensor), so
    each step's shapes and control flow depend only on its phase, t mod model.cfg.total_factor(): one graph
    per phase, captured at first use. That static arithmetic runs on any device with ``graphs=False``
    (tests/unit/test_decode.py checks it against the full forward on CPU); only the capture is CUDA's.
    The buffers are grown to the cache's max_len first and never move (a step past max_len is refused);
    model.decode on the same cache stays valid between steps; after cache.reorder, make a new GraphStep
    (the graphs hold the old buffers). Imports nothing CUDA-specific until a graph is captured."""

    def __init__(self, model, cache: DecodeCache, graphs: bool = True):
        if cache.length < 1:
            raise ValueError("GraphStep decodes after a prompt: call model.decode(prompt, cache) first")
        self.model, self.cache, self.period = model, cache, model.cfg.total_factor()
        device = model.layers[0].embed.weight.device
        self.graphs = graphs
        if graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {device}: "
                             f"GraphStep(model, cache, graphs=False) runs the same steps without them")
        cache.reserve(model, cache.max_len, full=True)  # every buffer at its final size before any capture
        for st in cache.states:
            if st.site is not None:
                st.site.kv.clear_unfilled()
        self.tok = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)  # the graphs' inputs
        self.t = torch.zeros((), dtype=torch.long, device=device)
        self.captured: dict[int, tuple] = {}  # phase -> (CUDAGraph, its logits buffer (B, 1, V))

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        model, cache = self.model, self.cache
        _check_tokens(model, tokens, cache)
        t = cache.length
        if tokens.shape[1] != 1 or t + 1 > cache.max_len:
            raise ValueError(f"GraphStep takes one token per row (got {tokens.shape[1]}) within the cache's "
                             f"max_len = {cache.max_len} (at {t}); use model.decode beyond that")
        self.tok.copy_(tokens)
        self.t.fill_(t)
        if not self.graphs:
            logits = _step(cache, self.tok, t, self.t)
        else:
            if t % self.period not in self.captured:
                self.captured[t % self.period] = self._capture(t)
            graph, out = self.captured[t % self.period]
            graph.replay()
            logits = out.clone()  # the next replay of this graph overwrites ``out``
        cache.sync(model, t + 1)
        return logits

    def _capture(self, t: int) -> tuple:
        """Warm up once, then capture, the step of token t's phase. The warm-up writes real buffers: its K/V
        rows are those of token t (rewritten by the replay that follows); the resampling rows it writes are
        put back."""
        cache = self.cache
        pend = [(st.pend, st.pend.clone()) for st in cache.states if st.pend is not None]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _step(cache, self.tok, t, self.t)
        torch.cuda.current_stream().wait_stream(side)
        for buf, saved in pend:
            buf.copy_(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _step(cache, self.tok, t, self.t)
        return graph, out

