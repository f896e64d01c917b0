"""Hourglass as a transformers model: HourglassConfig, HourglassCache and HourglassForCausalLM.

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)   # DIR from hgscale export --format hf
    logits = model(input_ids).logits                 # (B, T, V), hgscale's HourglassLM forward
    out = model.generate(input_ids, max_new_tokens=128, do_sample=False)        # on the Hourglass cache

This module is the transformers half of the exported modeling file (hgscale.checkpoint.hf.bundle puts our model
code in front of it and drops the hgscale imports); in hgscale it is importable as it is, for tests and export.

generate() decodes incrementally with HourglassLM's own cache (hgscale/models/decode.py: key/value rows per level,
the pending rows of each shortening window), wrapped as a transformers ``Cache``: one token of work per step at
every level, shortened levels included, and the logits equal the full forward's. Hourglass has no attention mask:
its shortening pools neighbouring positions, so a padded batch cannot be made exact; prompts of one batch must have
equal lengths (a padding mask is refused by name). Sequences are limited to max_seq_len tokens.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from hgscale.config import ModelConfig
from hgscale.models.hourglass import HourglassLM

STANDARD_NAMES = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "intermediate_size": "d_ff",
                  "max_position_embeddings": "max_seq_len"}  # transformers' names for our model keys


def _config_class() -> type:
    """HourglassConfig: a PreTrainedConfig whose fields are ModelConfig's (names, types, defaults), so the two
    cannot drift; transformers' standard names map onto ours."""
    fields = dataclasses.fields(ModelConfig)
    ns = {"__module__": __name__, "__doc__": "hgscale's model section as a transformers config.",
          "model_type": "hourglass", "attribute_map": dict(STANDARD_NAMES),
          "__annotations__": {f.name: f.type for f in fields}, **{f.name: f.default for f in fields}}
    return type("HourglassConfig", (PreTrainedConfig,), ns)


HourglassConfig = _config_class()


def model_config(config: PreTrainedConfig) -> ModelConfig:
    """The ModelConfig HourglassLM is built from (size cleared: every key is explicit)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{**values, "size": ""})


class HourglassCache(Cache):
    """HourglassLM's decoding cache as a transformers Cache. Built empty; the first forward sizes it for its batch
    (generate() may have expanded the prompts for num_return_sequences by then)."""

    def __init__(self):
        super().__init__(layers=[])
        self.state = None  # hgscale DecodeCache, made by the first decode

    def decode(self, model: HourglassLM, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, n) following the cached tokens -> logits (B, n, V)."""
        B, n = input_ids.shape
        limit = model.cfg.max_seq_len
        if self.get_seq_length() + n > limit:
            raise ValueError(f"{self.get_seq_length() + n} tokens exceed max_seq_len = {limit} of this Hourglass "
                             f"model; generate fewer tokens (max_new_tokens) or shorten the prompt")
        if self.state is None:
            self.state = model.init_cache(B)
        elif self.state.batch_size != B:
            raise ValueError(f"this cache holds {self.state.batch_size} sequences, the input has {B}")
        return model.decode(input_ids, self.state)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.state is None else int(self.state.length)

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:  # no rollback of shortened levels: no assisted decoding
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state.reorder(beam_idx)  # beam search: rows follow their beams


class HourglassForCausalLM(PreTrainedModel, GenerationMixin):
    """tokens (B, T) -> logits (B, T, V); labels (B, T) are shifted here, as transformers' causal LMs do."""

    config_class = HourglassConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: PreTrainedConfig):
        super().__init__(config)
        self.model = HourglassLM(model_config(config))  # initialises itself; from_pretrained builds it on meta
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: HourglassLM draws its own initial weights (trax or normal scheme), the file replaces them."""

    def generate(self, *args, **kwargs):
        """transformers' generate on an HourglassCache (unless a cache is given or use_cache=False); a request
        longer than max_seq_len is refused before any token is generated."""
        inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        want = (inputs.shape[-1] if inputs is not None else 0) + (kwargs.get("max_new_tokens") or 0)
        if want > self.model.cfg.max_seq_len:
            raise ValueError(f"{want} tokens (prompt + max_new_tokens) exceed max_seq_len = "
                             f"{self.model.cfg.max_seq_len} of this Hourglass model; generate fewer tokens")
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None and kwargs.get("use_cache", True):
            kwargs["cache"] = HourglassCache()
        return super().generate(*args, **kwargs)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, past_key_values: Cache | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("Hourglass has no attention mask (its shortening pools neighbouring positions, so "
                             "padding would change the real tokens' logits): pass prompts of equal length without "
                             "padding, or one prompt at a time")
        if (use_cache or cache is not None) and not self.training:
            if not isinstance(cache, HourglassCache):
                cache = _own_cache(cache)
            logits = cache.decode(self.model, input_ids)
        else:
            logits, cache = self.model(input_ids), None
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)


def _own_cache(cache: Cache | None) -> HourglassCache:
    """An HourglassCache in place of none, or of an empty cache of another kind (a caller's DynamicCache)."""
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(f"an Hourglass model decodes with HourglassCache, not {type(cache).__name__}: start "
                         f"generation without a cache (or with HourglassCache())")
    return HourglassCache()
