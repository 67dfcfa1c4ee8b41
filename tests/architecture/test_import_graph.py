"""docs/ARCHITECTURE.md's import graph, checked by parsing every import of the package folders.

Layers, lowest first; a module may import its own layer and the layers below it, never one above:
    kernels  ->  core (hgrn_megatron/: model, config, corpus, ...)  ->  tokenizer  ->  pretrain  ->  export
    ->  evaluation
Inside core, `corpus` (reading shards) imports nothing of the project but `config_base`, so the tokenizer and the
training pipeline can both stand on it.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# folder -> import name (setup.py's package_dir)
FOLDERS = {"kernels": "hgrn_megatron.kernels", "tokenizer": "hgrn_megatron.tokenizer",
           "pretrain": "hgrn_megatron.pretrain", "hgrn_megatron": "hgrn_megatron"}
LAYERS = ["kernels", "core", "tokenizer", "pretrain", "export", "evaluation"]
CORPUS_MAY_IMPORT = {"hgrn_megatron.config_base", "hgrn_megatron.corpus"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "hgrn_megatron":
        raise ValueError(module)
    if len(parts) > 1 and parts[1] in ("kernels", "tokenizer", "pretrain", "export", "evaluation"):
        return parts[1]
    return "core"


def modules():
    """(import name, path) of every module in the package folders."""
    for folder, root in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "hf_files" in path.parts:  # shipped with exports, imports nothing of ours by design
                continue
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join([root, *rel]).removesuffix(".__init__")
            if folder == "hgrn_megatron" and rel[0] in ("kernels", "tokenizer", "pretrain"):
                continue
            yield name, path


def imports_of(name: str, path: Path) -> set[str]:
    """Project modules imported by one file (absolute and relative imports, also inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
    return {m for m in found if m == "hgrn_megatron" or m.startswith("hgrn_megatron.")}


def test_every_import_points_down_the_layers():
    problems = []
    for name, path in modules():
        mine = LAYERS.index(layer_of(name))
        for target in imports_of(name, path):
            if target == "hgrn_megatron":
                continue  # the root package's docstring and version only
            if LAYERS.index(layer_of(target)) > mine:
                problems.append(f"{path.relative_to(ROOT)} ({layer_of(name)}) imports {target} ({layer_of(target)})")
            if name.startswith("hgrn_megatron.corpus") and not any(
                target == m or target.startswith(m + ".") for m in CORPUS_MAY_IMPORT
            ):
                problems.append(f"{path.relative_to(ROOT)} (corpus) imports {target}")
    assert not problems, "imports against docs/ARCHITECTURE.md's graph:\n" + "\n".join(problems)


def test_the_check_sees_relative_and_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from ..tokenizer import x\ndef f():\n    from hgrn_megatron.export import y\n")
    assert imports_of("hgrn_megatron.pretrain.probe", probe) == {"hgrn_megatron.tokenizer", "hgrn_megatron.export"}


def test_architecture_doc_states_the_checked_graph():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert "kernels → core → tokenizer → pretrain → export → evaluation" in text
