"""Trainer parts for ``data.mixture`` (hgscale/data/mixture.py); a plain dataset keeps the usual Validation.

    MixtureValidation  every train.eval_interval steps: val/<name>/loss and val/<name>/bpc per source, and the
                       overall val/loss and val/bpc (all bits over all bytes of the sources' batches)
    SourceShares       every train.log_interval steps and at the end: data/share/<name>, the fraction of the
                       training tokens drawn so far from each source (all ranks together)
"""
from __future__ import annotations

from hgscale.distributed.parts import Part, StepResult, Validation


def data_parts(tr) -> list[Part]:
    """The validation (and, for a mixture, share) parts for ``tr.dataset``."""
    if not hasattr(tr.dataset, "sources"):
        return [Validation(tr)]
    return [MixtureValidation(tr), SourceShares()]


class MixtureValidation(Part):
    pauses_clock = True

    def __init__(self, tr):
        t, d = tr.cfg.train, tr.cfg.data
        self.interval = t.eval_interval
        self.sets: list[tuple[str, list | None, float]] = []
        if not self.interval:
            return
        if tr.eng.reads_data:
            self.sets = tr.dataset.eval_sets(d.valid_split, t.micro_batch_size, d.seq_len, tr.eng.dp_rank,
                                             tr.eng.dp_size, max_batches=t.eval_batches)
        else:  # a pipeline's middle stage: no batches, but the same collectives, source by source
            self.sets = [(n, None, ds.bits_per_nat_token_for(d.valid_split)) for n, _, ds in tr.dataset.sources]

    def after_step(self, tr, r: StepResult) -> None:
        if self.interval and r.step % self.interval == 0:
            self.run(tr, r.step)

    def run(self, tr, step: int) -> None:
        from hgscale.data.mixture import combine_eval
        from hgscale.tracking import names

        metric, rows, vals = tr.metric, [], {}
        for name, batches, bits in self.sets:
            loss = tr.eng.eval_loss(batches)  # COLLECTIVE, once per source on every rank
            if loss is None:
                continue
            vals[f"val/{name}/loss"], vals[f"val/{name}/{metric}"] = loss, loss * bits
            rows.append((loss, len(batches or ()) or 1, bits))  # equal batch shapes: batches weigh the tokens
        if not rows:
            return
        loss, overall = combine_eval(rows)
        vals.update({"val/loss": loss, names.val_metric(metric): overall})
        per = " | ".join(f"{n} {vals[f'val/{n}/{metric}']:.4f}" for n, _, _ in self.sets if f"val/{n}/loss" in vals)
        tr.say(f"validation at step {step}: loss {loss:.4f} | {metric} {overall:.4f} ({per})")
        tr.record(step, vals)


class SourceShares(Part):
    def after_step(self, tr, r: StepResult) -> None:
        t = tr.cfg.train
        if r.step % t.log_interval and r.step != t.steps or tr.stream is None:
            return  # the counts are global (the same on every rank that reads data): rank 0 logs them
        counts = tr.stream.source_tokens
        total = sum(counts.values())
        if total:
            tr.record(r.step, {f"data/share/{n}": c / total for n, c in counts.items()})
