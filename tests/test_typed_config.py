"""The one typed-config loader (deepwhale.typed_config) behind the data and train configs."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from deepwhale.data.config import LOADER as DATA_LOADER
from deepwhale.data.config import PipelineConfigError, parse_config
from deepwhale.train.config import LOADER as TRAIN_LOADER
from deepwhale.train.config import TrainConfigError
from deepwhale.typed_config import ConfigError, Loader


@dataclass
class Inner:
    """A nested section."""

    rate: float = 0.5
    names: list[str] = field(default_factory=list)
    limit: int | None = None

    def __post_init__(self) -> None:
        LENIENT.check_range("outer.inner.rate", self.rate, 0, 1)


@dataclass
class Outer:
    """A top-level section holding a nested one."""

    flag: bool = False
    inner: Inner = field(default_factory=Inner)


LENIENT = Loader()
STRICT = Loader(strict=True)


def test_lenient_converts_strings_and_names_dotted_keys():
    out = LENIENT.build(
        Outer, {"flag": "yes", "inner": {"rate": "0.25", "names": "a, b", "limit": "null"}}
    )
    assert out == Outer(True, Inner(0.25, ["a", "b"], None))
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.rat'; valid keys in inner"):
        LENIENT.build(Outer, {"inner": {"rat": 1}})
    with pytest.raises(ConfigError, match=r"^inner.limit: expected an integer, got 'many'$"):
        LENIENT.build(Outer, {"inner": {"limit": "many"}})
    with pytest.raises(ConfigError, match=r"outer.inner.rate must be in \[0, 1\], got 2.0"):
        LENIENT.build(Outer, {"inner": {"rate": 2}})
    with pytest.raises(ConfigError, match=r"^inner: expected a mapping, got 3$"):
        LENIENT.build(Outer, {"inner": 3})


def test_strict_keeps_yaml_types():
    assert STRICT.build(Inner, {"rate": 1}, "inner").rate == 1.0  # an int is a float
    for data, message in [
        ({"names": "a"}, "inner.names: expected list, got str ('a')"),
        ({"names": [1]}, "inner.names[0]: expected str, got int (1)"),
        ({"limit": True}, "inner.limit: expected int, got bool (True)"),
        ({"rate": None}, "inner.rate: expected float, got NoneType (None)"),
    ]:
        with pytest.raises(ConfigError) as e:
            STRICT.build(Inner, data, "inner")
        assert str(e.value) == message
    with pytest.raises(ConfigError, match="flag: expected bool, got str"):
        STRICT.build(Outer, {"flag": "yes"})


def test_each_config_keeps_its_error_class():
    assert issubclass(PipelineConfigError, ConfigError)
    assert issubclass(TrainConfigError, ConfigError)
    with pytest.raises(PipelineConfigError, match=r"inner.limit: expected int, got str"):
        DATA_LOADER.build(Inner, {"limit": "x"}, "inner")
    with pytest.raises(TrainConfigError):
        TRAIN_LOADER.build(Inner, {"limit": "x"}, "inner")
    # values the old loader let through unchecked now fail with the key named
    with pytest.raises(PipelineConfigError, match=r"perplexity.max_ppl: expected float"):
        parse_config({"input": "a", "stages": [{"perplexity": {"max_ppl": "high"}}]})
    with pytest.raises(PipelineConfigError, match=r"quality.min_chars: expected int, got None"):
        parse_config({"input": "a", "stages": [{"quality": {"min_chars": None}}]})
