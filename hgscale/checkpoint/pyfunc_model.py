"""An exported HourglassLM as an MLflow pyfunc model: prompts in, completions out.

    model = mlflow.pyfunc.load_model("models:/hourglass-enwik8/1")
    model.predict(["The "], params={"max_tokens": 20, "temperature": 0})        # -> ["completion"]

This file is the model's code (MLflow 3 models-from-code, logged by :mod:`hgscale.checkpoint.registry`): MLflow
runs it when loading, under a module name of its own, and it hands MLflow the model with ``set_model``; no pickle
is involved. Weights come from the exported directory (model.safetensors + config.json) through hgscale's own
loader; text comes from :func:`hgscale.models.generation.generate` with the incremental cache.

Byte-level models take text and return text (UTF-8 bytes in and out, as ``hgscale sample --prompt``), and so do
SentencePiece models whose export holds their tokenizer.model (the dataset's, encoded line by line as in
training; the completion ends at the end of its document); models of another vocabulary take comma-separated
token ids and return the new ids the same way (``--prompt-ids``).
A completion holds the new text only, not the prompt.
"""
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from hgscale.data.codec import Codec, prompt_ids

#: generation parameters and their defaults (those of ``hgscale sample``); the model's ParamSchema lists them
PARAMS = {"max_tokens": 200, "temperature": 1.0, "top_p": 1.0}


def _prompts(model_input) -> list[str]:
    """A DataFrame's ``prompt`` column (its only column, when named otherwise), a list of strings, or one string."""
    if hasattr(model_input, "columns"):
        col = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        model_input = model_input[col].tolist()
    if isinstance(model_input, str):
        model_input = [model_input]
    prompts = list(model_input)
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"a prompt must be a string; got {type(bad[0]).__name__} {str(bad[0])[:50]!r}")
    return prompts


class HourglassPyfunc(PythonModel):
    """Loads the artifact ``model`` (an exported directory) once; ``predict`` completes each prompt."""

    def load_context(self, context) -> None:
        import torch

        from hgscale.checkpoint.export import load_exported

        device = (context.model_config or {}).get("device", "auto")
        if device == "auto":  # a serving machine with a GPU uses it; mlflow.pyfunc.load_model(..., model_config=)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.model, self.cfg = load_exported(context.artifacts["model"], device)
        tok = Path(context.artifacts["model"]) / "tokenizer.model"  # a SentencePiece model's (hgscale export)
        self.codec = Codec("sentencepiece", tok.read_bytes()) if tok.is_file() else None

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        """One completion per prompt. MLflow hands a DataFrame (the signature turns a list of strings into one);
        a direct call may pass a list."""
        import torch

        from hgscale.models.generation import generate, sample_text

        p = {**PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
        max_tokens, temperature, top_p = int(p["max_tokens"]), float(p["temperature"]), float(p["top_p"])
        if max_tokens < 0:
            raise ValueError(f"max_tokens = {max_tokens} must be >= 0")
        V = self.cfg.model.vocab_size
        out = []
        for prompt in _prompts(model_input):  # one at a time: prompts differ in length, and generate pads none
            ids = prompt_ids(prompt, V, self.codec)
            row = generate(self.model, torch.tensor([ids], device=self.device), max_tokens, temperature,
                           top_p=top_p)[0].tolist()
            out.append(self.codec.decode(row[len(ids):]) if self.codec else sample_text(row, len(ids), "", None,
                                                                                        V == 256))
        return out


# MLflow executes this file as the model's code under a generated module name; a plain import only defines things
if __name__ != "hgscale.checkpoint.pyfunc_model":
    mlflow.models.set_model(HourglassPyfunc())
