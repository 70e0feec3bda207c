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
