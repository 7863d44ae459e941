"""deepwhale.plugins.Registry: names registered in code and through real entry points (a
``*.dist-info`` folder on sys.path, read by importlib.metadata)."""

from __future__ import annotations

import importlib

import pytest

from deepwhale.plugins import PluginError, Registry, entry_points

GROUP = "deepwhale.test_plugins"


def _dist(root, name: str, lines: str, module: str | None = None) -> None:
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{lines}\n")
    if module:
        (root / f"{name}.py").write_text(module)


def test_register_get_and_names():
    reg: Registry[int] = Registry(GROUP, "widget")
    assert reg.register("one")(1) == 1
    reg.register("one")(1)  # the same object again is fine
    assert reg.get("one") == 1 and "one" in reg and "two" not in reg and 3 not in reg
    with pytest.raises(PluginError, match="widget 'one' is already registered"):
        reg.register("one")(2)
    with pytest.raises(PluginError, match="unknown widget 'two'; available: one"):
        reg.get("two")
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("")
    assert Registry("deepwhale.nothing", "thing").names() == []


def test_entry_points_load_lazily_and_code_wins(tmp_path, monkeypatch):
    _dist(tmp_path, "plug_a", "alpha = plug_a:VALUE\nbeta = plug_a:nope", "VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    reg: Registry[int] = Registry(GROUP, "widget")
    assert reg.names() == ["alpha", "beta"] and "alpha" in reg
    assert reg.get("alpha") == 41 and reg.get("alpha") == 41  # cached
    with pytest.raises(PluginError, match=r"'plug_a:nope'.*plug_a.*failed to load"):
        reg.get("beta")
    reg.register("alpha")(7)
    assert reg.get("alpha") == 7
    reg.register("zeta")(8)  # code order first, then the other entry points sorted
    assert reg.names(sort=False) == ["alpha", "zeta", "beta"]
    assert reg.names() == ["alpha", "beta", "zeta"]


def test_unregister_forgets_code_names_and_loaded_entry_points(tmp_path, monkeypatch):
    _dist(tmp_path, "plug_d", "delta = plug_d:VALUE", "VALUE = 4\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    reg: Registry[int] = Registry(GROUP, "widget")
    reg.register("one")(1)
    assert reg.unregister("one") is True and "one" not in reg
    assert reg.unregister("one") is False  # nothing left to drop
    with pytest.raises(PluginError, match="unknown widget 'one'"):
        reg.get("one")
    reg.register("one")(2)  # the name is free again
    assert reg.get("one") == 2
    reg.register("delta")(5)  # code shadows the entry point ...
    assert reg.get("delta") == 5 and reg.unregister("delta")
    assert reg.get("delta") == 4  # ... until unregistered; then the entry point loads
    assert reg.unregister("delta") is True  # drops the loaded entry point from the cache
    assert "delta" in reg and reg.get("delta") == 4  # still declared, so loaded afresh
    assert reg.names(sort=False) == ["one", "delta"]


def test_conflicting_entry_points_are_reported(tmp_path, monkeypatch):
    _dist(tmp_path, "plug_b", "gamma = plug_b:X", "X = 1\n")
    _dist(tmp_path, "plug_c", "gamma = plug_c:Y", "Y = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.raises(PluginError, match="'gamma' in group .* declared twice"):
        entry_points(GROUP)
