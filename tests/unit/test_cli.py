"""The one `hgscale` command and the layout rules of the code base."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from hgscale.commands import COMMANDS

ROOT = Path(__file__).resolve().parents[2]


def hgscale(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "hgscale", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_usage_lists_every_command_and_an_unknown_one_is_refused():
    r = hgscale("--help")
    assert r.returncode == 0
    for name in ("train", "evaluate", "sample", "export", "report", "plan", "config", "verify", "prepare"):
        assert f"  {name} " in r.stdout, name
    bad = hgscale("trian")
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name):
    r = hgscale(name, "--help")
    assert r.returncode == 0, r.stderr[-1000:]
    assert "usage:" in r.stdout.lower() or "hgscale prepare" in r.stdout


def test_the_console_script_and_the_launch_path():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"hgscale": "hgscale.commands:main"}
    r = subprocess.run([sys.executable, str(ROOT / "hgscale" / "train.py"), "--help"], capture_output=True,
                       text=True, timeout=120)  # `deepspeed hgscale/train.py --config ...` runs this file
    assert r.returncode == 0 and "--config" in r.stdout


def _layout_checker():
    spec = importlib.util.spec_from_file_location("layout_check", ROOT / ".ci" / "layout.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_code_base_keeps_its_layout_rules():
    r = subprocess.run([sys.executable, str(ROOT / ".ci" / "layout.py")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "", r.stdout


def test_the_layout_checker_finds_circles_and_long_code(tmp_path):
    check = _layout_checker()
    assert check.circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert check.circles({"a": {"b"}, "b": set()}) == []
    long = tmp_path / "long.py"
    long.write_text("def f():\n" + "    x = 1\n" * 70)
    check.ROOT = tmp_path
    [msg] = check.sizes(long)
    assert "function f has 71 lines (at most 60)" in msg


def test_the_layout_checker_refuses_an_arrow_up_between_packages():
    check = _layout_checker()
    edges = {"hgscale.checkpoint.compat": {"hgscale.training.layout", "hgscale.checkpoint.layout"},
             "hgscale.training.layout": {"hgscale.config"}, "hgscale.checkpoint.layout": {"hgscale.core.status"},
             "hgscale.config": set(), "hgscale.core.status": set(), "hgscale": {"hgscale.commands"}}
    [msg] = check.upward(edges)
    assert msg.startswith("hgscale.checkpoint.compat imports hgscale.training.layout: training stands above checkpoint")
    assert check.upward({"hgscale.training.x": {"hgscale.checkpoint.y"}}) == []
