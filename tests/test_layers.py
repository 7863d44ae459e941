"""The package's import layers (docs/ARCHITECTURE.md, "Packages"), read from the source with
``ast``: a package imports only packages on lower layers, so there is no import circle (the
model configuration lives with the model, and the inference package never reaches up to
``deepwhale.api``)."""

from __future__ import annotations

import ast
from pathlib import Path

import deepwhale

ROOT = Path(deepwhale.__file__).parent
# lower number = lower layer; "" is the package root (only ``__version__``)
LAYER = {
    "": 0,
    "atomic": 0,
    "device": 0,
    "dictionary": 0,
    "extras": 0,
    "plugins": 0,
    "typed_config": 0,
    "model": 1,
    "checkpoint": 2,
    "tokenizer": 2,
    "lora": 3,
    "inference": 4,
    "api": 5,
    "config": 5,  # the deprecated alias of deepwhale.model.config
    "data": 6,
    "eval": 6,
    "serve": 6,
    "train": 6,
    "parallel": 6,
    "cli": 7,
    "__main__": 8,
}
# same-layer imports that are allowed (train <-> parallel share the training loop's pieces;
# the data pipeline's perplexity filter uses eval.perplexity)
SIDEWAYS = {
    ("data", "inference"),
    ("data", "eval"),
    ("train", "data"),
    ("train", "parallel"),
    ("parallel", "train"),
}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _edges() -> set[tuple[str, str, str]]:
    out = set()
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        src = _package(".".join(rel.parts).removesuffix(".__init__"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name == "deepwhale" or name.startswith("deepwhale."):
                    out.add((src, _package(name), str(path.relative_to(ROOT))))
    return out


def test_every_package_has_a_layer():
    assert {src for src, _, _ in _edges()} <= set(LAYER)


def test_packages_import_only_lower_layers():
    bad = sorted(
        f"{where}: {src} -> {dst}"
        for src, dst, where in _edges()
        if src != dst and LAYER[dst] >= LAYER[src] and (src, dst) not in SIDEWAYS
    )
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_old_import_paths_still_work():
    import warnings

    from deepwhale import api, inference
    from deepwhale.inference import deepseek
    from deepwhale.model import config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import importlib

        import deepwhale.config as old

        importlib.reload(old)
    assert old.ModelConfig is config.ModelConfig and old.ConfigError is config.ConfigError
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    assert api.DeepSeekModel is inference.DeepSeekModel is deepseek.DeepSeekModel
    assert api.generate_text is inference.generate_text and api.DEFAULT_MODEL.is_dir()


def test_long_modules_say_why_they_stay_whole():
    """A module over 600 lines states in its docstring why it is not split ("stays whole")."""
    long = {}
    for path in ROOT.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 600:
            long[str(path.relative_to(ROOT))] = ast.get_docstring(ast.parse(text)) or ""
    bad = sorted(name for name, doc in long.items() if "stays whole" not in doc)
    assert long and not bad, "modules over 600 lines without a reason:\n" + "\n".join(bad)


def test_no_module_imports_another_modules_private_names():
    """``from deepwhale.x import _name`` is refused: a name used by another module is public in
    its owner (``augment.check_augment``, ``pipeline.CountOutput``)."""
    bad = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            module = node.module or ""
            if node.level == 0 and module != "deepwhale" and not module.startswith("deepwhale."):
                continue
            bad += [
                f"{path.relative_to(ROOT)}:{node.lineno}: {module}.{a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
    assert not bad, "private names imported across modules:\n" + "\n".join(sorted(bad))
