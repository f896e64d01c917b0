"""The typed config: parsing, overrides, and errors that name the field and the fix."""
import json

import pytest

from hgscale.config import (
    MODEL_SIZES,
    Config,
    ConfigError,
    ModelConfig,
    config_from_dict,
    field_docs,
    load_config,
    parse_hierarchy,
)
from hgscale.core.notation import checkpointed_levels
from hgscale.training.layout import ParallelLayout

BASE = {"model": {"size": "debug"}, "data": {"url": "/tmp/none", "seq_len": 64}}


# ----------------------------------------------------------------------------------------- hierarchy

@pytest.mark.parametrize("spec, levels", [
    ("12@1", [(12, 1)]),
    ("5@1 24@3 5@1", [(5, 1), (24, 3), (5, 1)]),
    ("3@1 2@2 5@8 2@2 3@1", [(3, 1), (2, 2), (5, 8), (2, 2), (3, 1)]),
    ("2@1 4@4 1@1", [(2, 1), (4, 4), (1, 1)]),  # layer counts may differ between way down and up
    ("0@1 4@2 0@1", [(0, 1), (4, 2), (0, 1)]),
])
def test_hierarchy_valid(spec, levels):
    assert parse_hierarchy(spec) == levels


@pytest.mark.parametrize("spec, why", [
    ("", "is empty"),
    ("5@1 24@3", "odd number"),
    ("5@1 24@3 5@2", "not a palindrome"),
    ("2@2 4@4 2@2", "outermost factor is 2"),
    ("2@1 3@3 4@4 3@3 2@1", "does not strictly grow from 3"),
    ("2@1 3@2 4@3 3@2 2@1", "factor 3 does not strictly grow from 2 and divide"),
    ("5x1 24@3 5@1", "not of the form N@K"),
    ("5@0 24@3 5@0", "factors are >= 1"),
    ("1@1 0@2 1@1", "innermost level has no layers"),
])
def test_hierarchy_invalid_names_string_and_problem(spec, why):
    with pytest.raises(ValueError) as e:
        parse_hierarchy(spec)
    msg = str(e.value)
    assert repr(spec) in msg and why in msg


def test_model_config_helpers():
    m = ModelConfig(hierarchy="3@1 2@2 5@8 2@2 3@1")
    assert m.total_factor() == 8 and m.n_layers() == 15


# ------------------------------------------------------------------------------------------ loading

def test_named_size_then_explicit_keys_override():
    cfg = config_from_dict({**BASE, "model": {"size": "debug", "d_model": 48, "n_heads": 4}})
    assert cfg.model.d_model == 48 and cfg.model.n_heads == 4
    assert cfg.model.hierarchy == MODEL_SIZES["debug"]["hierarchy"]


def test_overrides_are_typed_by_field():
    cfg = config_from_dict(BASE, ["train.lr=3e-4", "model.hierarchy=2@1 4@2 2@1", "train.steps=7",
                                  "tracking.enabled=false", "train.betas=[0.9, 0.95]", "run_dir=out"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.hierarchy == "2@1 4@2 2@1" and cfg.train.steps == 7
    assert cfg.tracking.enabled is False and cfg.train.betas == [0.9, 0.95] and cfg.run_dir == "out"


def test_int_accepted_for_float_and_stays_float():
    cfg = config_from_dict({**BASE, "train": {"lr": 1}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError) as e:
        config_from_dict({**BASE, "train": {"lerning_rate": 1, "lr": 1e-3, "stepz": 3}})
    msg = str(e.value)
    assert "unknown key train.stepz; did you mean train.steps?" in msg
    assert "unknown key train.lerning_rate" in msg


def test_wrong_type_names_field_and_expected_type():
    with pytest.raises(ConfigError) as e:
        config_from_dict(BASE, ["train.steps=ten"])
    assert 'train.steps = "ten" has the wrong type: expected an integer' in str(e.value)


def test_all_problems_gathered_and_raised_once():
    bad = {"model": {"size": "debug", "d_model": 30, "n_heads": 4, "downsample": "max", "hierarchy": "2@1 3@2"},
           "data": {"url": ""}, "train": {"precision": "fp8", "steps": "x"}, "sectoin": {}}
    with pytest.raises(ConfigError) as e:
        config_from_dict(bad)
    probs = e.value.problems
    joined = "\n".join(probs)
    for needle in ["unknown key sectoin",
                   "train.steps", "model.hierarchy '2@1 3@2'", "model.downsample = 'max' is not one of",
                   "model.d_model = 30 is not divisible by model.n_heads = 4", "train.precision = 'fp8'",
                   "data.url is empty"]:
        assert needle in joined, (needle, joined)
    assert len(probs) >= 7


def test_pipeline_constraints():
    with pytest.raises(ConfigError) as e:
        config_from_dict({**BASE, "parallel": {"pipeline_stages": 2, "zero_stage": 3},
                          "model": {"size": "debug", "hierarchy": "1@1 2@3 1@1"}, "data": {"url": "x", "seq_len": 64}})
    msg = str(e.value)
    assert "zero_stage = 3 cannot be combined with pipeline_stages = 2" in msg
    # seq_len need not divide by the factor, pipelines included: the embedding layer pads to a fixed shape
    config_from_dict({**BASE, "parallel": {"pipeline_stages": 2, "zero_stage": 1},
                      "model": {"size": "debug", "hierarchy": "1@1 2@3 1@1"}, "data": {"url": "x", "seq_len": 64}})


def test_batch_arithmetic_prints_the_equation():
    cfg = config_from_dict({**BASE, "train": {"micro_batch_size": 4, "grad_accum_steps": 2, "global_batch_size": 32},
                            "parallel": {"pipeline_stages": 2}})
    with pytest.raises(ConfigError) as e:
        ParallelLayout.of(cfg, 4)
    assert ("train.global_batch_size = 32 != micro_batch_size 4 x grad_accum_steps 2 x data-parallel size 2 "
            "(= 4 processes / 2 stages) = 16") in str(e.value)
    ParallelLayout.of(cfg, 8)  # 4 x 2 x 4 = 32
    with pytest.raises(ConfigError, match="world size 3 is not divisible by parallel.pipeline_stages = 2"):
        ParallelLayout.of(cfg, 3)


def test_sequence_parallel_needs_heads_a_world_and_no_pipeline_or_lsh():
    cfg = config_from_dict({**BASE, "parallel": {"sequence_parallel": 4, "pipeline_stages": 2},
                            "model": {"size": "debug", "d_model": 48, "n_heads": 6, "vanilla_attention": "lsh",
                                      "attention": "rotary"}})
    with pytest.raises(ConfigError) as e:
        ParallelLayout.of(cfg, 12)
    msg = str(e.value)
    assert "world size 12 is not divisible by parallel.sequence_parallel = 4 x pipeline_stages = 2" in msg
    assert "cannot be combined with pipeline_stages = 2: DeepSpeed's pipeline topology has no sequence axis" in msg
    assert "does not divide model.n_heads = 6: each rank attends with n_heads / N heads; use one of [2, 3, 6]" in msg
    assert "model.vanilla_attention = 'lsh'" in msg
    ok = config_from_dict({**BASE, "parallel": {"sequence_parallel": 2}, "train": {"micro_batch_size": 2,
                                                                                  "grad_accum_steps": 1,
                                                                                  "global_batch_size": 4}})
    lay = ParallelLayout.of(ok, 4)  # 2 data-parallel x 2 sharing each sequence
    assert (lay.dp, lay.sp, lay.global_batch) == (2, 2, 4)
    assert lay.topology(None)["sequence_parallel_size"] == 2
    with pytest.raises(ConfigError, match=r"data-parallel size 1 \(= 2 processes / 1 stages / 2 sharing a sequence\)"):
        ParallelLayout.of(ok, 2)


@pytest.mark.parametrize("policy, levels", [(True, {0, 1, 2, 3, 4}), ("all", {0, 1, 2, 3, 4}), (False, set()),
                                            ("none", set()), ("full_resolution", {0, 4}), ([1, 3], {1, 3})])
def test_checkpointing_policies_name_levels(policy, levels):
    cfg = config_from_dict({**BASE, "parallel": {"activation_checkpointing": policy},
                            "model": {"size": "debug", "hierarchy": "1@1 1@2 2@4 1@2 1@1"}})
    assert checkpointed_levels(cfg.parallel.activation_checkpointing, cfg.model.levels()) == levels


def test_checkpointing_policy_of_the_wrong_type():
    with pytest.raises(ConfigError, match=r"parallel.activation_checkpointing = 3 has the wrong type: expected true "
                                          r"or false or a string or a list"):
        config_from_dict({**BASE, "parallel": {"activation_checkpointing": 3}})


def test_more_stages_than_layers():
    cfg = config_from_dict({**BASE, "parallel": {"pipeline_stages": 64}})
    with pytest.raises(ConfigError, match="pipeline_stages = 64 exceeds the"):
        ParallelLayout.of(cfg, 64)


def test_load_config_file_and_errors(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(BASE))
    assert load_config(p, ["train.steps=3"]).train.steps == 3
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    p.write_text("{bad json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_config(p)


def test_every_field_has_a_one_line_doc():
    docs = field_docs()
    assert len(docs) > 40
    for key, doc, _ in docs:
        assert doc and "\n" not in doc, key


def test_defaults_round_trip_through_json():
    cfg = config_from_dict(BASE)
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again, Config)


def test_resume_from_a_url_is_refused_with_the_way_to_do_it():
    """checkpoint.resume takes a local path; a checkpoint in object storage resumes through checkpoint.dir."""
    with pytest.raises(ConfigError) as e:
        config_from_dict(BASE, ["checkpoint.resume=s3://bucket/run/step00000100"])
    assert ("checkpoint.resume = 's3://bucket/run/step00000100': takes 'auto', 'never' or a local checkpoint path; "
            "to resume from a URL set checkpoint.dir to it and checkpoint.resume=auto") in str(e.value)
