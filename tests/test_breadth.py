"""Breadth: every causal-LM architecture the installed transformers maps (tiny random builds,
listed from its auto-mapping, not by hand) through every job: one-shot Wanda and SparseGPT at
50% and 2:4, structural neurons / heads / layers / experts at two ratios.

An outcome must be ``ok`` (exact amounts, the pruned model runs, pruned == masked wherever
the report says exact), ``n/a`` (the model has no such structure) or ``refused`` (a specific
prunekit error, with the caller's model left exactly as it was). Never a crash, a model left
broken, a wrong amount, an "exact" result that differs from masking, or a hang. A sample runs
in the default suite; every family under ``-m breadth`` (CI runs it).
"""
from __future__ import annotations


import pytest
import torch

import prunekit.schedules  # noqa: F401  (imported before jobs fork)
import prunekit.structural  # noqa: F401
from prunekit.evaluate.breadth import JOBS, Job, Outcome, run_isolated, run_job
from prunekit.models.tiny import causal_lm_types, tiny_causal_lm

FAMILIES = causal_lm_types()
SAMPLE = [f for f in ("llama", "qwen3_moe", "mamba", "bloom", "gpt_bigcode", "rwkv", "deepseek_v3") if f in FAMILIES]
ALLOWED = {"ok", "n/a", "refused"}
IDS = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("quiet")  # breadth runs hundreds of models: no warnings


def buildable(family: str, isolated: bool) -> None:
    """Skip (naming why) a family whose tiny random config transformers itself cannot run."""
    build = Job("build", "forward", "")
    out = run_isolated(lambda: tiny_causal_lm(family), IDS, build, family, 60) if isolated else \
        run_job(lambda: tiny_causal_lm(family), IDS, build, family)
    if out.status != "ok":
        pytest.skip(f"the tiny random {family} does not run in transformers itself: {out.detail[:200]}")


def check(outcomes: list[Outcome]) -> None:
    bad = [f"{o.job}: {o.status}: {o.detail[:300]}" for o in outcomes if o.status not in ALLOWED]
    assert not bad, "\n".join(bad)
    for o in outcomes:
        if o.status == "refused":
            assert len(o.detail) > 40, o  # a specific error, not a bare message


@pytest.mark.parametrize("family", SAMPLE)
def test_a_sample_of_families(family):
    buildable(family, isolated=False)
    outcomes = [run_job(lambda: tiny_causal_lm(family), IDS, job, family) for job in JOBS]
    check(outcomes)
    assert all(o.status == "ok" for o in outcomes if o.job.startswith(("wanda", "sparsegpt"))), outcomes


@pytest.mark.breadth
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_transformers_ships(family):
    buildable(family, isolated=True)
    tiny_causal_lm(family)  # the family's modeling code imported once, before the jobs fork
    check([run_isolated(lambda: tiny_causal_lm(family), IDS, job, family, timeout=120) for job in JOBS])


def test_the_family_list_comes_from_the_installed_transformers():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert FAMILIES == sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) and len(FAMILIES) > 100
