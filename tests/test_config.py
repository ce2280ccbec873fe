"""Config parsing and validation: every bad value gets a specific error naming the fix."""
import pytest

from prunekit.config import Allocation, Calibration, Pattern, PruneConfig
from prunekit.errors import ConfigError


@pytest.mark.parametrize("text,expected", [("unstructured", Pattern()), ("2:4", Pattern("nm", 2, 4)),
                                           (" 4 : 8 ", Pattern("nm", 4, 8)),
                                           ("unstructured:layer", Pattern(group="layer"))])
def test_pattern_parse(text, expected):
    assert Pattern.parse(text) == expected


@pytest.mark.parametrize("text,match", [("4:2", "0 < N < M"), ("4:4", "0 < N < M"), ("0:4", "0 < N < M"),
                                        ("blocks", "unknown pattern"), ("unstructured:col", "unknown pattern")])
def test_pattern_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        Pattern.parse(text)


@pytest.mark.parametrize("sparsity", [1.0, 1.5, -0.1, float("nan")])
def test_sparsity_range(sparsity):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        PruneConfig.from_method("wanda", sparsity=sparsity)


def test_nm_sparsity_must_agree():
    assert PruneConfig.from_method("wanda", pattern="2:4").sparsity == 0.5
    assert PruneConfig.from_method("wanda", pattern="1:4").sparsity == 0.75
    with pytest.raises(ConfigError, match="drop --sparsity"):
        PruneConfig.from_method("wanda", pattern="2:4", sparsity=0.7)
    with pytest.raises(ConfigError, match="allocation uniform"):
        PruneConfig.from_method("wanda", pattern="2:4", allocation=Allocation("owl"))


@pytest.mark.parametrize("kwargs,match", [
    ({"score": "fisher"}, "unknown score 'fisher'; choose one of: gblm, magnitude, obs, random, ria, taylor, wanda"),
    ({"reconstruction": "lsq"}, "unknown reconstruction"),
    ({"allocation": Allocation("bogus")}, "unknown allocation 'bogus'"),
])
def test_unknown_names(kwargs, match):
    """Configs hold values; names are checked against the registries when a recipe is
    resolved (``prunekit.resolve.check``), which every entry point does before it starts."""
    from prunekit.recipe import one_stage
    from prunekit.resolve import check

    cfg = PruneConfig(**kwargs)
    with pytest.raises(ConfigError, match=match):
        check(cfg)
    with pytest.raises(ConfigError, match=match):
        one_stage(cfg)


def test_unknown_method():
    with pytest.raises(ConfigError, match="unknown method 'obd'"):
        PruneConfig.from_method("obd")


def test_calibration_and_owl_ranges():
    with pytest.raises(ConfigError, match="nsamples"):
        Calibration(nsamples=0)
    from prunekit.resolve import check

    with pytest.raises(ConfigError, match="OWL needs m > 0 and 0 <= lambda < 0.5"):
        check(PruneConfig(allocation=Allocation("owl", owl_lambda=0.6)))
    with pytest.raises(ConfigError, match=r"allocation 'erk' does not take \['m'\]; its parameters: power"):
        check(PruneConfig(allocation=Allocation("erk", params=(("m", 3),))))


def test_configs_import_no_registry():
    """No import, not even inside a function, of the registries a config is checked against
    (SparseGPT's parameter class, read for recipes saved in the older format, is the one
    import from a registry's package)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "prunekit"
    for path in (root / "config.py", root / "structural" / "config.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                assert not any(r in module for r in ("scoring", "allocation", "scores", "layers", "experts")), \
                    (path.name, module)
                assert "reconstruct" not in module or module.endswith("sparsegpt"), (path.name, module)


def test_yaml_round_trip():
    cfg = PruneConfig.from_method("sparsegpt", pattern="4:8", calibration=Calibration(16, 256, 4, 3), seed=7)
    assert PruneConfig.from_yaml(cfg.to_yaml()) == cfg
    cfg2 = PruneConfig.from_method("wanda", allocation=Allocation("owl", 7.0, 0.1), sparsity=0.7)
    assert PruneConfig.from_dict(cfg2.to_dict()) == cfg2


def test_yaml_unknown_key():
    with pytest.raises(ConfigError, match="unknown recipe keys"):
        PruneConfig.from_dict({"score": "wanda", "sparsity_ratio": 0.5})
    with pytest.raises(ConfigError, match="unknown keys"):
        PruneConfig.from_dict({"calibration": {"samples": 3}})
