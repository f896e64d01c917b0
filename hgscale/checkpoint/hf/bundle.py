"""The Hugging Face modeling file, generated from our own model code: one Python file that imports only the
standard library, torch and transformers.

    source = modeling_source()        # text of modeling_hourglass.py; export_hf writes it beside the weights

The file is the modules of :mod:`hgscale.models` that HourglassLM needs, the hierarchy parser, a ModelConfig
record generated from our ModelConfig's fields, and :mod:`hgscale.checkpoint.hf.modeling` (the transformers
classes), concatenated in import order with the imports between them removed. So the exported model runs the
very code hgscale trains and tests, never a second copy that could drift; a top-level name defined by two of
those modules, or an hgscale import left over, is an error here, not a silently wrong file.
"""
from __future__ import annotations

import ast
import builtins
import dataclasses
import dis
import inspect
import textwrap
import types
from importlib import import_module
from pathlib import Path

PACKAGE = "hgscale"
ROOT_MODULE = "hgscale.checkpoint.hf.modeling"
TOKENIZER_MODULE = "hgscale.checkpoint.hf.tokenization"
# Generated instead of read from their modules (config.py would bring the whole training config), after the
# modules the generated text needs
SHIMMED = {"hgscale.config": ("hgscale.core.notation",)}
# Modules of which the model needs a few names only (the other grammars of config values stay out)
ONLY = {"hgscale.core.notation": ("_LEVEL_RE", "parse_hierarchy", "INIT_SCHEMES", "INIT_GROUPS", "INIT_RECIPES",
                                    "parse_init_layers")}
CONFIG_METHODS = ("levels", "total_factor", "n_layers")  # what the model code calls on its config


class BundleError(RuntimeError):
    """The model code cannot be bundled as it stands (a name clash, an import the bundle cannot resolve)."""


def _source(module: str) -> str:
    return Path(import_module(module).__file__).read_text()


def _internal_imports(tree: ast.Module) -> list[str]:
    """hgscale modules a module imports at any depth of its top level (TYPE_CHECKING blocks included)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            if node.module == "hgscale.models":  # `from hgscale.models import blocked_attention`: a module
                out += [f"hgscale.models.{a.name}" for a in node.names]
            else:
                out.append(node.module)
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise BundleError(f"`import {node.names[0].name}` cannot be bundled: use `from ... import name`")
    return out


def _order(root: str) -> list[str]:
    """Modules reachable from ``root`` by hgscale imports, each after those it imports (depth-first); a shimmed
    module stands after the modules its generated text needs."""
    done: list[str] = []

    def visit(mod: str, path: tuple) -> None:
        if mod in done:
            return
        if mod in path:
            raise BundleError(f"import circle {' -> '.join(path + (mod,))}")
        deps = SHIMMED[mod] if mod in SHIMMED else _internal_imports(ast.parse(_source(mod)))
        for dep in deps:
            visit(dep, path + (mod,))
        done.append(mod)

    visit(root, ())
    return done


def _is_internal(node: ast.stmt) -> bool:
    if isinstance(node, ast.ImportFrom):
        return bool(node.module) and node.module.split(".")[0] == PACKAGE
    if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
        return all(_is_internal(n) for n in node.body)  # type-only imports of bundled names
    return False


def _split(module: str) -> tuple[list[str], str, list[str]]:
    """(external import lines, body without imports, top-level names) of one module; its docstring becomes a
    comment (it says what the code below it does, with shapes)."""
    src = _source(module)
    tree = ast.parse(src)
    lines = src.splitlines()
    imports, names, drop = [], [], set()
    for i, node in enumerate(tree.body):
        span = range(node.lineno - 1, node.end_lineno)
        if module in ONLY and not isinstance(node, (ast.Import, ast.ImportFrom)) and \
                not set(_defined(node)) & set(ONLY[module]):
            drop.update(span)
            continue
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            drop.update(span)  # the module docstring: kept as a comment header below
        elif isinstance(node, (ast.Import, ast.ImportFrom)) or _is_internal(node):
            drop.update(span)
            if not _is_internal(node) and not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                imports.append(ast.unparse(node))
        names += _defined(node)
    body = "\n".join(line for j, line in enumerate(lines) if j not in drop).strip("\n")
    doc = ast.get_docstring(tree) if module not in ONLY else None
    if doc:
        body = "\n".join(f"# {line}".rstrip() for line in doc.splitlines()) + "\n\n" + body
    return imports, body, names


def _defined(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return [t.id for t in targets if isinstance(t, ast.Name)]


def _config_shim() -> str:
    """ModelConfig as a plain dataclass with our ModelConfig's fields and defaults, and the methods the model
    code calls, copied from it; ConfigError as a ValueError. The values were checked when the model was
    exported: problems() returns none (a hand-edited hierarchy still fails in levels(), by name)."""
    from hgscale.config import ModelConfig

    missing = [f.name for f in dataclasses.fields(ModelConfig) if f.default is dataclasses.MISSING]
    if missing:  # a default_factory has no literal to write
        raise BundleError(f"model keys {missing} have no plain default: give them one (the export writes it)")
    fields = "\n".join(f"    {f.name}: {f.type} = {f.default!r}" for f in dataclasses.fields(ModelConfig))
    methods = "\n".join(textwrap.indent(textwrap.dedent(inspect.getsource(getattr(ModelConfig, m))), "    ")
                        for m in CONFIG_METHODS)
    return (f"@dataclass\nclass ModelConfig:\n    \"\"\"hgscale's model section (the model keys of config.json)."""
            f"\"\"\"\n\n{fields}\n\n{methods}\n\n    def problems(self) -> list:\n        return []\n\n\n"
            f"class ConfigError(ValueError):\n    def __init__(self, problems: list, source: str = \"config\"):\n"
            f"        super().__init__(f\"{{source}}: {{'; '.join(problems)}}\")")


def modeling_source(root: str = ROOT_MODULE) -> str:
    """The text of the self-contained file of ``root`` and what it imports of hgscale (the module docstring); the
    modeling file by default, the tokenizer file with ``root = TOKENIZER_MODULE``."""
    modules = _order(root)
    imports, parts, owner = [], [], {}
    for mod in modules:
        if mod in SHIMMED:
            imports.append("from dataclasses import dataclass")
            parts.append(f"# {'-' * 40} {mod} (generated)\n\n{_config_shim()}")
            continue
        imp, body, names = _split(mod)
        for n in names:
            if n in owner:
                raise BundleError(f"{n!r} is defined by both {owner[n]} and {mod}: rename one (the model code is "
                                  f"bundled into one file for Hugging Face export)")
            owner[n] = mod
        imports += imp
        parts.append(f"# {'-' * 40} {mod}\n\n{body}")
    aliases = [f"{name} = sys.modules[__name__]  # `from hgscale.models import {name}`: the module is this file"
               for name in sorted(_module_imports(modules))]
    imports = sorted(set(imports) | ({"import sys"} if aliases else set()), key=_import_key)
    blocks = ["\n".join(imports)] + (["\n".join(aliases)] if aliases else []) + parts
    text = _header(root, modules) + "\n\n\n".join(blocks) + "\n"
    _check(text)
    return text


def _module_imports(modules: list[str]) -> set[str]:
    """Modules some bundled module imports as objects (``from hgscale.models import blocked_attention``)."""
    out = set()
    for mod in modules:
        for node in ast.walk(ast.parse(_source(mod))) if mod not in SHIMMED else ():
            if isinstance(node, ast.ImportFrom) and node.module == "hgscale.models":
                out.update(a.name for a in node.names)
    return out


def _import_key(line: str) -> tuple:
    """Standard library first, then torch (and sentencepiece), then transformers; ``import x`` first."""
    root = line.split()[1].split(".")[0]
    return ({"sentencepiece": 1, "torch": 1, "transformers": 2}.get(root, 0), root, line.startswith("from"), line)


def _header(root: str, modules: list[str]) -> str:
    """The file's docstring: the first line of ``root``'s, where it comes from, what it bundles."""
    first = (ast.get_docstring(ast.parse(_source(root))) or "").splitlines()[0]
    return (f'"""{first}\n\nGenerated by `hgscale export --format hf` from hgscale\'s code; it imports no hgscale '
            f'module.\nBundled: {", ".join(modules)}\n"""\nfrom __future__ import annotations\n\n')


def _check(text: str) -> None:
    """The file compiles, names no hgscale module (``hgscale`` only in comments and strings) and reads no global
    name it does not define (a name of a partly bundled module left out of ONLY)."""
    tree = ast.parse(text)
    for node in ast.walk(tree):
        mod = node.module if isinstance(node, ast.ImportFrom) else None
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if (mod or "").split(".")[0] == PACKAGE or any(n.split(".")[0] == PACKAGE for n in names):
            raise BundleError(f"the modeling file still imports hgscale (line {node.lineno})")
    missing = _undefined_globals(compile(text, "modeling_hourglass.py", "exec"))
    if missing:
        raise BundleError(f"the modeling file reads {', '.join(sorted(missing))} but does not define it: add it to "
                          f"bundle.ONLY or bundle its module")


def _undefined_globals(module: types.CodeType) -> set[str]:
    """Global names that code of ``module`` (its functions, and its own top level) reads and neither the module's
    top level nor a ``global`` statement nor builtins define."""
    defined, read, todo = set(dir(builtins)) | {"__file__", "__annotations__"}, set(), [module]
    while todo:
        code = todo.pop()
        for ins in dis.get_instructions(code):
            if ins.opname == "STORE_GLOBAL" or (code is module and ins.opname == "STORE_NAME"):
                defined.add(ins.argval)
            elif ins.opname == "LOAD_GLOBAL" or (code is module and ins.opname == "LOAD_NAME"):
                read.add(ins.argval)
        todo += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return read - defined
