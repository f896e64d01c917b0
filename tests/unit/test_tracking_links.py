"""Links into the MLflow UI (hgscale.tracking.links)."""
from hgscale.tracking.links import experiment_link, link_lines, local_ui_command, run_link, ui_base


def test_a_server_link_keeps_its_path_and_drops_credentials():
    uri = "https://alice:s3cret@mlflow.example.com:8443/tracking/?x=1"
    assert ui_base(uri) == "https://mlflow.example.com:8443/tracking"
    assert experiment_link(uri, "7") == ("https://mlflow.example.com:8443/tracking/#/experiments/7/runs"
                                         "?workflowType=machine_learning")
    assert run_link(uri, "7", "abc") == ("https://mlflow.example.com:8443/tracking/#/experiments/7/runs/abc/"
                                         "model-metrics?workflowType=machine_learning")
    lines = link_lines(uri, "7", "abc")
    assert len(lines) == 2 and not any("s3cret" in line or "alice" in line for line in lines)


def test_a_local_store_links_to_mlflow_ui_and_says_how_to_start_it():
    uri = "sqlite:////runs/demo/mlflow.db"
    assert ui_base(uri) is None and local_ui_command(uri) == f"mlflow ui --backend-store-uri {uri}"
    lines = link_lines(uri, "1", "r1")
    assert lines[0] == "MLflow training runs: http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
    assert lines[2] == f"  (a local store: serve it with `mlflow ui --backend-store-uri {uri}`)"


def test_nothing_to_link_without_an_experiment_or_a_store():
    assert link_lines("http://host:5000", None) == [] and link_lines("", "1") == []
    assert experiment_link("", "1") is None
