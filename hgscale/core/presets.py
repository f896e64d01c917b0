"""Named model sizes (``model.size``); explicit model keys override a size's values."""
from __future__ import annotations

from typing import Any

# Named sizes. `debug` is what CPU tests and the demo build on. The paper's sizes follow google/trax
# trax/supervised/configs/hourglass_<name>.gin (HourglassLM.*; trax passes `dropout` to attention too).
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "debug": dict(vocab_size=256, d_model=32, n_heads=2, d_ff=64, hierarchy="1@1 2@2 1@1",
                  dropout=0.0, max_seq_len=512),
    "small": dict(d_model=256, n_heads=4, d_ff=1024, hierarchy="2@1 8@3 2@1", max_seq_len=2048),
    "enwik8": dict(vocab_size=256, d_model=512, n_heads=8, d_ff=2048, hierarchy="5@1 24@3 5@1",
                   downsample="attention_avg", upsample="attention_repeat", attention="relative",
                   dropout=0.2, attn_dropout=0.2, max_seq_len=8192),  # trax drops attention probs at `dropout` too
    "enwik8_baseline": dict(vocab_size=256, d_model=512, n_heads=8, d_ff=2048, hierarchy="34@1",
                            attention="relative", dropout=0.2, attn_dropout=0.2, max_seq_len=8192),
    "imagenet32": dict(vocab_size=256, d_model=512, n_heads=8, d_ff=2048, hierarchy="3@1 24@3 3@1",
                       downsample="attention_linear", upsample="attention_linear", dropout=0.01,
                       attn_dropout=0.01, max_seq_len=3072),
    "imagenet64": dict(vocab_size=256, d_model=768, n_heads=8, d_ff=3072, hierarchy="3@1 12@3 3@1",
                       downsample="linear", upsample="linear", dropout=0.0, max_seq_len=12288,
                       vanilla_attention="lsh", lsh_chunk_len=256, lsh_n_hashes=2, lsh_chunks_before=1),
    "cifar10": dict(vocab_size=256, d_model=512, n_heads=8, d_ff=2048, hierarchy="1@1 8@3 1@1",
                    downsample="attention_linear", upsample="attention_linear", dropout=0.0, max_seq_len=3072),
    "wiki40b": dict(vocab_size=32000, d_model=512, n_heads=8, d_ff=2048, hierarchy="4@1 8@4 4@1",
                    downsample="attention_avg", upsample="attention_linear", attention="relative",
                    dropout=0.0, attn_dropout=0.0, max_seq_len=2048),
}
