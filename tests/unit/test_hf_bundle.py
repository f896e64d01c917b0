"""The generated Hugging Face modeling file (``hgscale.checkpoint.hf.bundle``): it holds every name its code reads,
and a bundle that would leave one out, or keep an hgscale import, is refused at export, by name."""
import pytest

from hgscale.checkpoint.hf import bundle


@pytest.mark.parametrize("root", [bundle.ROOT_MODULE, bundle.TOKENIZER_MODULE])
def test_the_generated_files_define_every_global_they_read(root):
    text = bundle.modeling_source(root)
    assert bundle._undefined_globals(compile(text, "f.py", "exec")) == set()


def test_a_name_left_out_of_a_partly_bundled_module_is_refused(monkeypatch):
    """parse_init_layers reads INIT_RECIPES: bundling the parser without it is an error naming it, not a file that
    raises NameError when a user builds a fresh model."""
    names = tuple(n for n in bundle.ONLY["hgscale.core.notation"] if n != "INIT_RECIPES")
    monkeypatch.setitem(bundle.ONLY, "hgscale.core.notation", names)
    with pytest.raises(bundle.BundleError, match="reads INIT_RECIPES but does not define it: add it to bundle.ONLY"):
        bundle.modeling_source()


@pytest.mark.parametrize("text, why", [
    ("def f():\n    return g()\n", "reads g but does not define it"),
    ("x = y + 1\n", "reads y but does not define it"),
    ("from hgscale.models import flops\n", r"still imports hgscale \(line 1\)"),
])
def test_check_refuses_a_file_that_cannot_run_alone(text, why):
    with pytest.raises(bundle.BundleError, match=why):
        bundle._check(text)


def test_check_accepts_what_python_defines_by_itself():
    """Builtins, module dunders, annotations, names a function declares global, names defined after their use."""
    bundle._check("from __future__ import annotations\nimport sys\nX: int = 1\n"
                  "def f():\n    global Y\n    Y = len(sys.argv) + X\n    return later(), __file__, __name__\n"
                  "def later():\n    return Y\n")
