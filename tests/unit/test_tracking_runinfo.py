"""Secret masking, config flattening, manifest summary, metric-name lookup and rank-0 aggregation."""
import pytest

from hgscale.core.secrets import MASK, mask_args, mask_secrets, mask_value
from hgscale.tracking import aggregate, gather_to_rank0, names
from hgscale.tracking.mlflow_sink import is_transient_tracking_error
from hgscale.tracking.records import clean_key
from hgscale.tracking.runinfo import command_line, flatten, manifest_summary


def test_mask_secret_keys_and_values():
    cfg = {
        "data": {"url": "s3://bucket/enwik8", "s3_endpoint_url": "http://127.0.0.1:9000",
                 "storage_options": {"key": "AKIAABCDEFGHIJKLMNOP", "secret": "wJalrXUtnFEMI/K7MDENG",
                                     "client_kwargs": {"region_name": "us-east-1"}}},
        "aws_secret_access_key": "abc", "aws_session_token": "tok", "password": "hunter2",
        "hf_token": "hf_abcdefghijklmnopqrstuvwxyz", "bits_per_nat_token": 1.4427,
        "mirror": "https://alice:pa55word@example.com/data", "note": "key AKIAQWERTYUIOPASDFGH inside",
        "signed": "https://b.s3.amazonaws.com/o?X-Amz-Signature=deadbeef&X-Amz-Date=2024",
        "tokenizer": "spm.model", "max_tokens": 100, "empty_secret": "", "bytes_per_token": "3.7",
        "api_key": "None",
    }
    m = mask_secrets(cfg)
    assert m["data"]["url"] == "s3://bucket/enwik8"
    assert m["data"]["s3_endpoint_url"] == "http://127.0.0.1:9000"
    assert m["data"]["storage_options"]["key"] == MASK
    assert m["data"]["storage_options"]["secret"] == MASK
    assert m["data"]["storage_options"]["client_kwargs"]["region_name"] == "us-east-1"
    for k in ("aws_secret_access_key", "aws_session_token", "password", "hf_token", "note"):
        assert m[k] == MASK, k
    assert m["bits_per_nat_token"] == 1.4427        # numbers are never secrets
    assert m["mirror"] == f"https://alice:{MASK}@example.com/data"
    assert m["signed"] == f"https://b.s3.amazonaws.com/o?X-Amz-Signature={MASK}&X-Amz-Date=2024"
    assert m["tokenizer"] == "spm.model" and m["max_tokens"] == 100 and m["empty_secret"] == ""
    assert m["bytes_per_token"] == "3.7" and m["api_key"] == "None"   # numbers and nulls as text are settings
    assert cfg["password"] == "hunter2"              # the input is not modified


def test_numeric_strings_under_secret_keys_are_masked_but_rates_and_numbers_stay():
    cfg = {"token": "1234", "pin_secret": "0042", "data": {"password": "007"}, "api_key": "false",
           "bits_per_nat_token": "1.4427", "bytes_per_token": "3.7", "tokens_per_s": "812.5", "token_count": 7,
           "max_token": 4096, "auth": {"token": 99}, "secret": 1.5}
    m = mask_secrets(cfg)
    assert m["token"] == MASK and m["pin_secret"] == MASK and m["data"]["password"] == MASK
    assert m["api_key"] == "false"                                 # a boolean literal: a setting
    assert m["bits_per_nat_token"] == "1.4427" and m["bytes_per_token"] == "3.7" and m["tokens_per_s"] == "812.5"
    assert m["token_count"] == 7 and m["max_token"] == 4096 and m["auth"]["token"] == 99 and m["secret"] == 1.5
    assert mask_args(["data.token=1234", "--token", "99"]) == [f"data.token={MASK}", "--token", MASK]


@pytest.mark.parametrize("value, masked", [
    ("https://tok@host/path", f"https://{MASK}@host/path"),                       # a token as the user name
    ("s3://key:secret@bucket/enwik8", f"s3://{MASK}@bucket/enwik8"),              # the user is an access key
    ("s3a://AKIDEXAMPLE@bucket", f"s3a://{MASK}@bucket"),
    ("https://alice:pa55word@example.com/data", f"https://alice:{MASK}@example.com/data"),
    ("https://u:p@ss@host/a", f"https://u:{MASK}@host/a"),                        # "@" inside the password
    ("mlflow at http://ghtoken@127.0.0.1:5000 is down", f"mlflow at http://{MASK}@127.0.0.1:5000 is down"),
    ("http://host/p?q=a@b", "http://host/p?q=a@b"),                                # no user-info: unchanged
    ("s3://bucket/enwik8", "s3://bucket/enwik8"),
    ("mail x@y.com from http://a.com", "mail x@y.com from http://a.com"),
    (f"https://{MASK}@host", f"https://{MASK}@host"),                              # masking twice changes nothing
])
def test_url_user_info_is_masked(value, masked):
    assert mask_value(value) == masked
    assert mask_secrets({"data": {"url": value}})["data"]["url"] == masked


def test_manifest_numbers_as_text_survive_masking():
    """The tracker masks the manifest before summarising it: its rates, counts and checksums stay readable."""
    man = {"name": "enwik8", "bytes_per_token": "1.0", "bits_per_nat_token": "1.4427", "tokenizer": "tokenizer.model",
           "tokenizer_sha256": "ab" * 32, "splits": {"train": {"num_tokens": 90, "shards": [{"sha256": "cd" * 32}]}}}
    s = manifest_summary(mask_secrets(man))
    assert s["bytes_per_token"] == "1.0" and s["bits_per_nat_token"] == "1.4427"
    assert s["tokenizer"] == "tokenizer.model" and s["tokenizer_sha256"] == "ab" * 32
    assert s["splits.train.num_tokens"] == "90"


def test_command_line_masks_overrides():
    cmd = command_line(["train.py", "--config", "c.json", "data.s3_secret=XYZ", "--api-key", "abc", "train.lr=1e-3"])
    assert cmd == f"train.py --config c.json data.s3_secret={MASK} --api-key {MASK} train.lr=1e-3"


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2], "d": {}}, "e": True, "f": None}) == \
        {"a.b": "1", "a.c": "[1, 2]", "a.d": "{}", "e": "true", "f": "null"}
    assert flatten({"x": 1}, "ds") == {"ds.x": "1"}


def test_manifest_summary():
    man = {"name": "enwik8", "vocab_size": 256, "splits": {"train": {"tokens": 90_000_000, "shards": ["a", "b", "c"]}},
           "deep": {"a": {"b": {"c": 1}}}}
    s = manifest_summary(man)
    assert s["name"] == "enwik8" and s["vocab_size"] == "256"
    assert s["splits.train.tokens"] == "90000000" and s["splits.train.shards.n"] == "3"
    assert s["deep.a.b.n"] == "1"
    assert manifest_summary(None) == {}


def test_clean_key_and_transient_errors():
    assert clean_key("time/stage0/fwd@bwd (s)") == "time/stage0/fwd_bwd _s_"
    assert clean_key("//a//b/") == "a/b"
    assert len(clean_key("x" * 400)) == 250
    from mlflow.exceptions import MlflowException, RestException
    assert is_transient_tracking_error(ConnectionError("refused"))
    assert is_transient_tracking_error(
        MlflowException("API request to http://x failed with exception Max retries exceeded"))
    assert is_transient_tracking_error(MlflowException("API request to endpoint /x failed with error code 503 != 200"))
    assert not is_transient_tracking_error(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}))
    assert is_transient_tracking_error(
        RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "database is locked"}))
    assert not is_transient_tracking_error(KeyError("a bug is not an outage"))


def test_val_key_lookup():
    assert names.find_val_key({"train/loss", "val/bpd", "val/loss"}) == "val/bpd"
    assert names.find_val_key({"train/loss", "val/loss"}) == "val/loss"
    assert names.find_val_key({"train/loss"}) is None
    assert names.first_present(names.FLOPS_KEYS, {"total_flops", "x"}) == "total_flops"


def test_gather_without_process_group_is_local():
    assert gather_to_rank0({"a": 1}) == [{"a": 1}]


def test_aggregate_stages_and_nodes():
    recs = [
        {"rank": 0, "stage": 0, "timings": {"step_s": 1.0, "compute_s": 0.8, "data_s": 0.1, "wait_s": 0.1},
         "system": {"node": "n1", "cpu_percent": 50.0, "mem_used_gb": 10.0, "mem_percent": 40.0, "rss_gb": 2.0,
                    "gpu_peak_gb": 30.0}},
        {"rank": 1, "stage": 0, "timings": {"step_s": 1.2, "compute_s": 0.6, "data_s": 0.3, "wait_s": 0.3},
         "system": {"node": "n1", "cpu_percent": 55.0, "mem_used_gb": 11.0, "mem_percent": 41.0, "rss_gb": 3.0,
                    "gpu_peak_gb": 35.0}},
        {"rank": 2, "stage": 1, "timings": {"step_s": 1.0, "compute_s": 0.5, "wait_s": 0.5},
         "system": {"node": "n2.cluster", "cpu_percent": 20.0, "mem_used_gb": 5.0, "mem_percent": 20.0, "rss_gb": 1.0}},
    ]
    m = aggregate(recs)
    assert m["time/step_s"] == 1.2 and m["time/data_s"] == 0.3          # slowest rank
    assert m["time/stage0/compute_s"] == 0.7 and m["time/stage1/compute_s"] == 0.5
    # stage 0 waits on its neighbour (0.1 + 0.25)/2 = 0.175 of its steps, stage 1 waits 0.5
    assert abs(m["pipeline/bubble_share"] - (0.175 + 0.5) / 2) < 1e-9
    assert "pipeline/bubble_share" not in aggregate([{"rank": 0, "timings": {"step_s": 1.0, "compute_s": 0.9}}])
    assert m["system/n1/cpu_percent"] == 50.0 and m["system/n1/rss_gb"] == 5.0
    assert m["system/n1/gpu_peak_gb"] == 35.0 and "system/n2.cluster/gpu_peak_gb" not in m
    assert m["system/n2.cluster/mem_used_gb"] == 5.0
    assert m["memory/max_rank_peak_gb"] == 35.0


def test_aggregate_sums_data_counters_over_the_first_stage():
    """Storage retries and skipped shards of every data-parallel rank's stream, each counted once: a pipeline's
    last stage reads the same stream as its first and is left out."""
    recs = [{"rank": 0, "stage": 0, "counters": {"retries": 2, "skipped_shards": 1}},
            {"rank": 1, "stage": 0, "counters": {"retries": 3, "skipped_shards": 0}},
            {"rank": 2, "stage": 1, "counters": {"retries": 2, "skipped_shards": 1}},
            {"rank": 3, "stage": 1}]
    m = aggregate(recs)
    assert m["data/retries"] == 5.0 and m["data/skipped_shards"] == 1.0
