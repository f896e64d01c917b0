"""Shared test set-up. Fixture modules for real services live in tests/fixtures/ and are registered here."""
import os

# Two cores: keep each test process from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.mlflow_server",
    "tests.fixtures.slurm",
]
