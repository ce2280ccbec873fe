"""The catalogue ``prunekit list`` prints: every entry of every registry has a one-line
description, shows its parameter defaults and names its paper; generated over the registries,
so a new entry is checked the moment it is registered."""
from __future__ import annotations

import dataclasses
import json

import pytest

import prunekit.kv.policies  # noqa: F401  (registers kv_policies; not yet in registry._PROVIDERS)
from prunekit.registry import ALL, EntryInfo, catalogue, entries, format_entries

FOUND = entries()  # imports every module that registers entries
EVERY = [(kind, e.name) for kind, group in FOUND.items() for e in group]


def _info(kind: str, name: str) -> EntryInfo:
    return next(e for e in FOUND[kind] if e.name == name)


def _expected_defaults(cls: type) -> dict:
    """From the dataclass itself: each field (under its YAML alias) and its default."""
    yaml_name = {field: alias for alias, field in getattr(cls, "ALIASES", {}).items()}
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out[yaml_name.get(f.name, f.name)] = default
    return out


def test_entries_cover_every_registry_and_pseudo_kind():
    assert set(FOUND) == set(ALL) | {"structures", "stages"}
    for kind, registry in ALL.items():
        assert [e.name for e in FOUND[kind]] == registry.names()
        assert all(e.kind == kind for e in FOUND[kind])


@pytest.mark.parametrize("kind,name", EVERY)
def test_every_entry_has_a_one_line_description(kind, name):
    about = _info(kind, name).description
    assert about.strip() and "\n" not in about and "``" not in about, (kind, name, about)
    assert len(about) <= 60, f"{kind} {name}: keep the docstring's first line short, got {about!r}"


@pytest.mark.parametrize("kind,name", [(k, n) for k, n in EVERY if k in ALL])
def test_defaults_are_exactly_the_params_dataclass(kind, name):
    cls = ALL[kind].params_of(name)
    info = _info(kind, name)
    if kind == "methods":  # a preset shows the defaults of its score and reconstruction
        score, reconstruction = ALL[kind].get(name)
        expected = {}
        for k, n in (("scores", score), ("reconstructions", reconstruction)):
            part = ALL[k].params_of(n)
            expected.update(_expected_defaults(part) if part else {})
        assert info.defaults == expected
    elif cls is None:
        assert info.defaults == {}
    else:
        assert info.defaults == _expected_defaults(cls)
        assert list(info.defaults) == list(_expected_defaults(cls))  # in field order


def test_params_dataclasses_are_linked_to_their_entries():
    from prunekit.allocation import ALLOCATIONS
    from prunekit.allocation.erk import ErkParams
    from prunekit.allocation.global_minimum import GlobalMinParams
    from prunekit.allocation.owl import OwlParams
    from prunekit.reconstruct import RECONSTRUCTIONS
    from prunekit.reconstruct.sparsegpt import SparseGPTParams

    assert ALLOCATIONS.params_of("owl") is OwlParams and ALLOCATIONS.params_of("erk") is ErkParams
    assert ALLOCATIONS.params_of("global_min") is GlobalMinParams
    assert RECONSTRUCTIONS.params_of("sparsegpt") is SparseGPTParams
    for name in ALLOCATIONS.names():  # the catalogue shows the parameters the allocation builds
        assert ALLOCATIONS.params_of(name) is ALLOCATIONS.get(name).params
    assert _info("allocations", "owl").defaults == {"m": OwlParams().m, "lambda": OwlParams().lam}
    assert _info("methods", "sparsegpt").defaults == dataclasses.asdict(SparseGPTParams())


@pytest.mark.parametrize("kind,name", [
    ("scores", "wanda"), ("reconstructions", "sparsegpt"), ("methods", "wanda"), ("methods", "sparsegpt"),
    ("allocations", "owl"), ("allocations", "erk"), ("unit_scores", "flap"), ("unit_scores", "wanda"),
    ("init_scores", "snip"), ("init_scores", "grasp"), ("init_scores", "synflow"),
    ("layer_scores", "block_influence"),
])
def test_well_known_entries_name_their_paper(kind, name):
    info = _info(kind, name)
    authors, _, title = info.paper.partition(", ")
    assert authors and title, f"{kind} {name}: paper should read 'Authors YEAR, Title', got {info.paper!r}"
    assert any(ch.isdigit() for ch in authors) and info.citation.startswith(authors)


@pytest.mark.parametrize("kind,name", [("allocations", "uniform"), ("scores", "random"),
                                       ("patterns", "unstructured"), ("reconstructions", "none"),
                                       ("methods", "random")])
def test_entries_no_paper_introduced_have_none(kind, name):
    assert _info(kind, name).paper == ""


def test_methods_describe_themselves_by_their_components_and_inherit_the_paper():
    methods = ALL["methods"]
    for name in methods.names():
        score, reconstruction = methods.get(name)
        info = _info("methods", name)
        assert score in info.description and reconstruction in info.description
        assert info.paper == (_info("reconstructions", reconstruction).paper or _info("scores", score).paper)
    assert "SparseGPT" in _info("methods", "sparsegpt").paper and "Wanda" in _info("methods", "wanda").paper


def test_pseudo_kinds_match_what_configs_accept():
    from prunekit.structural.config import STRUCTURES

    assert [e.name for e in FOUND["structures"]] == list(STRUCTURES)
    assert [e.name for e in FOUND["stages"]] == ["structure", "weights", "training", "recovery"]


def test_citation_is_the_short_form():
    assert _info("allocations", "owl").citation == "Yin et al. 2024 (OWL)"
    assert EntryInfo("x", "scores", "d", {}, "A et al. 2020, Some Title").citation == "A et al. 2020"
    assert EntryInfo("x", "scores", "d").citation == ""


def test_format_entries_lists_each_name_once_with_its_defaults():
    text = format_entries(FOUND)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120
    for kind, group in FOUND.items():
        start = lines.index(f"{kind}:")
        rows = lines[start + 1 : start + 1 + len(group)]
        assert [r.split()[0] for r in rows] == [e.name for e in group]  # each name once, in order
        for e, row in zip(group, rows):
            assert e.description[:20] in row
            for key, value in e.defaults.items():
                assert f"{key}={value:g}" in row if isinstance(value, float) else f"{key}={value}" in row
    owl = next(line for line in lines if line.split()[0] == "owl")
    assert "m=5, lambda=0.08" in owl and "Yin et al. 2024" in owl
    # the description column starts at the same place on every line
    starts = {len(line) - len(line[2:].lstrip(" ").split(" ", 1)[1].lstrip(" ")) for line in lines
              if line.startswith("  ")}
    assert len(starts) == 1


def test_format_entries_one_kind_narrow_and_empty():
    one = format_entries(entries("allocations"))
    assert one.splitlines()[0] == "allocations:" and "Yin et al. 2024 (OWL)" in one
    narrow = format_entries(entries("allocations"), width=70)
    assert all(len(line) <= 70 for line in narrow.splitlines()) and "…" in narrow
    assert format_entries(entries(pattern="no-such-entry")) == ""
    assert format_entries(entries("allocations", "ow*")).splitlines()[1].split()[0] == "owl"


def test_json_form_round_trips():
    data = {kind: [dataclasses.asdict(e) for e in group] for kind, group in FOUND.items()}
    back = json.loads(json.dumps(data))
    assert back == data
    assert {kind: [EntryInfo(**d) for d in group] for kind, group in back.items()} == FOUND


def test_catalogue_keeps_its_shape():
    cat = catalogue()
    assert set(cat) == set(FOUND)
    assert cat["allocations"]["owl"] == _info("allocations", "owl").description
    assert catalogue("methods") == {"methods": {e.name: e.description for e in FOUND["methods"]}}
    assert set(catalogue("scores", "w*")["scores"]) == {"wanda"}
