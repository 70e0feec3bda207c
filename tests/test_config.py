"""Stage configs: defaults <- YAML file (or a section of it) <- --set overrides <- CLI options."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from dataengine.pipeline.core.config import from_dict, load_config, parse_overrides, to_dict


@dataclass
class Inner:
    steps: int = 10
    lr: float = 1e-3


@dataclass
class Outer:
    name: str = "a"
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.inner.steps < 0:
            raise ValueError(f"inner.steps={self.inner.steps}: must be >= 0")


def test_defaults_file_overrides_and_explicit_in_that_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: from-file\ninner:\n  steps: 5\nother:\n  name: section\n")
    assert load_config(Outer) == Outer()
    with pytest.raises(ValueError, match="unknown key"):
        load_config(Outer, str(path))  # "other" is not a field
    path.write_text("name: from-file\ninner:\n  steps: 5\n")
    cfg = load_config(Outer, str(path), ["inner.lr=0.5", "sizes=[3, 4]"], name="explicit")
    assert cfg == Outer(name="explicit", sizes=[3, 4], inner=Inner(steps=5, lr=0.5))
    assert load_config(Outer, str(path), name=None).name == "from-file"  # None = not given


def test_a_section_of_a_pipeline_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("pipeline: {root: x}\nouter:\n  name: s\n  inner: {steps: 2}\n")
    assert load_config(Outer, str(path), section="outer") == Outer(name="s", inner=Inner(2))
    assert load_config(Outer, str(path), section="absent") == Outer()


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(Outer, str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(Outer, str(bad))
    with pytest.raises(ValueError, match=r"Outer.inner: unknown key\(s\) \['stpes'\]"):
        load_config(Outer, None, ["inner.stpes=3"])
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["novalue"])
    with pytest.raises(ValueError, match="inner.steps=-1"):
        load_config(Outer, None, ["inner.steps=-1"])


def test_round_trip_through_a_dict():
    cfg = Outer(name="z", sizes=[9], inner=Inner(3, 0.1))
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert parse_overrides(["a.b.c=1", "a.d=x", "e="]) == {"a": {"b": {"c": 1}, "d": "x"},
                                                          "e": ""}


@dataclass
class Typed:
    mode: str = "ray"
    flag: bool = False
    count: int = 1
    rate: float = 0.5
    maybe: int | None = None
    names: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def test_overrides_are_converted_by_the_field_type_not_by_yaml():
    cfg = load_config(Typed, None, ["mode=off", "flag=off", "count=7", "rate=1e-3",
                                    "maybe=null", "names=[on, 007, yes]", "inner.lr=2"])
    assert cfg.mode == "off" and cfg.flag is False and cfg.count == 7 and cfg.rate == 1e-3
    assert cfg.maybe is None and cfg.names == ["on", "007", "yes"]
    assert cfg.inner.lr == 2.0 and isinstance(cfg.inner.lr, float)
    assert load_config(Typed, None, ["mode=", "flag=yes", "maybe=3"]) == Typed(
        mode="", flag=True, maybe=3)
    assert load_config(Typed, None, ["mode='off'"]).mode == "off"   # quoted as in YAML
    for item, word in (("count=seven", "count='seven': expected an integer"),
                       ("flag=maybe", "flag='maybe': expected a boolean"),
                       ("rate=fast", "rate='fast': expected a number"),
                       ("names=[unclosed", "not valid YAML")):
        with pytest.raises(ValueError, match=word):
            load_config(Typed, None, [item])
    # a YAML file's unquoted off is a boolean: a text field says how to write it
    with pytest.raises(ValueError, match="quote it"):
        from_dict(Typed, {"mode": False})


def test_dashboard_precompute_off_stays_text():
    from dataengine.pipeline.server.app import ServerConfig

    cfg = load_config(ServerConfig, None, ["precompute=off", "decoder=torch"])
    assert cfg.precompute == "off" and cfg.decoder == "torch"
