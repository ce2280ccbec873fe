"""KV-cache policies (prunekit.kv): exactness at a full budget, eviction that keeps generation
correct (checked against a full forward whose per-layer, per-head masks hide what the cache
dropped), hand-computed selections, magnitude pruning counts, and every error."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from transformers import DynamicCache

import prunekit.kv as kv
from conftest import ASSETS, DEVICES, tiny_model
from prunekit.errors import ConfigError, UnsupportedModelError
from prunekit.kv.policies import (
    KV_POLICIES, H2OParams, SnapKVParams, group_query_heads, h2o_keep, magnitude_prune, snapkv_keep, snapkv_votes,
    streaming_keep,
)

# a budget larger than any sequence below, for every policy (magnitude: every token in its dense window)
FULL = {"streaming": dict(budget=512), "h2o": dict(budget=512, window=4), "snapkv": dict(budget=512, observation=4),
        "magnitude": dict(window=512)}
SMALL = {"streaming": dict(budget=12, sink=2), "h2o": dict(budget=12, window=4),
         "snapkv": dict(budget=12, observation=4)}


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")  # 4 query heads on 2 key/value heads: GQA
    model.set_attn_implementation("eager")
    return model


def prompt(n: int = 20, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, cache, n: int = 8):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache=cache,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0)


def test_every_policy_is_registered_with_params_and_paper():
    assert KV_POLICIES.names() == ["h2o", "magnitude", "snapkv", "streaming"]
    for name in KV_POLICIES.names():
        info = KV_POLICIES.info(name)
        assert info.description and len(info.description) <= 60 and info.paper.split(", ")[0][-4:].isdigit()
        assert KV_POLICIES.params_of(name) is not None


# ---------------------------------------------------------------------------------------------
# contracts, generated over every registered policy

#: per policy, settings that make it act on a 20-token prompt (a new policy must add itself here)
ACTING = {"streaming": dict(budget=12, sink=4), "h2o": dict(budget=12, window=4),
          "snapkv": dict(budget=12, observation=4), "magnitude": dict(sparsity=0.5)}


def test_every_registered_policy_has_contract_settings():
    assert sorted(ACTING) == KV_POLICIES.names() == sorted(FULL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", KV_POLICIES.names())
def test_policy_contract(policy, dtype, device):
    """Budget respected exactly, deterministic, dtype and device of the model kept."""
    model = tiny_model("llama").to(device=device, dtype=dtype)
    model.set_attn_implementation("eager")
    ids = prompt(20).to(device)
    runs = []
    for _ in range(2):
        cache = kv.cache(model, policy, **ACTING[policy])
        out = generate(model, ids, cache, n=4)
        runs.append((out.sequences, [cache.positions(i) for i in range(2)]))
        for layer in cache.layers:
            assert layer.keys.dtype == layer.values.dtype == dtype
            assert layer.keys.device.type == layer.positions.device.type == device
            expected = 20 + 3 if policy == "magnitude" else 12 + (3 if policy == "snapkv" else 0)
            assert layer.keys.shape[-2] == layer.positions.shape[-1] == expected
        cache.close()
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


# ---------------------------------------------------------------------------------------------
# exactness: a budget no sequence reaches changes nothing


@pytest.mark.parametrize("policy", sorted(FULL))
def test_full_budget_generates_exactly_what_a_dynamic_cache_does(llama, policy):
    ids = prompt(20, batch=2)
    ref = generate(llama, ids, DynamicCache())
    with kv.cache(llama, policy, **FULL[policy]) as cache:
        out = generate(llama, ids, cache)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
    report = cache.report()
    assert report.kept == [27, 27] and report.tokens == 27 and report.kept_bytes == report.full_bytes


def test_past_key_values_keyword_and_magnitude_at_zero_sparsity_are_exact(llama):
    ids = prompt(16)
    ref = llama(ids, cache=DynamicCache()).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it cache=
        for cache in (kv.cache(llama, "magnitude", sparsity=0.0), kv.cache(llama, "h2o", budget=1.0, window=2)):
            assert torch.equal(llama(ids, past_key_values=cache).logits, ref)


def test_sdpa_model_streaming_is_exact_too():
    model = tiny_model("llama")  # sdpa: streaming needs no attention probabilities
    ids = prompt(20)
    ref = generate(model, ids, DynamicCache())
    out = generate(model, ids, kv.cache(model, "streaming", budget=64))
    assert torch.equal(out.sequences, ref.sequences)


# ---------------------------------------------------------------------------------------------
# eviction keeps generation correct


def test_streaming_keeps_sinks_and_window_for_three_budgets_of_tokens(llama):
    budget, sink = 12, 4
    cache = kv.cache(llama, "streaming", budget=budget, sink=sink)
    out = generate(llama, prompt(10), cache, n=3 * budget)
    assert out.sequences.shape[1] == 10 + 3 * budget
    seen = 10 + 3 * budget - 1  # the last token is sampled, not yet cached
    expected = [0, 1, 2, 3, *range(seen - (budget - sink), seen)]
    for i, layer in enumerate(cache.layers):
        assert layer.keys.shape[-2] == layer.values.shape[-2] == budget
        assert cache.positions(i)[0].tolist() == [expected, expected]  # both key/value heads
    assert cache.get_seq_length() == seen
    assert cache.report().kept == [budget, budget] and cache.report().peak_bytes <= cache.report().full_bytes


def step_by_step(model, ids, cache, steps: int):
    """Greedy decoding one forward at a time: the sequence, the logits, and per forward after the
    prompt its span and every layer's stored positions before it."""
    out = model(ids, cache=cache)
    logits, history, seq = [out.logits[:, -1]], [], ids
    for _ in range(steps):
        history.append((seq.shape[1], seq.shape[1] + 1, [cache.positions(i).clone() for i in range(len(cache.layers))]))
        tok = logits[-1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, tok], dim=1)
        logits.append(model(tok, cache=cache).logits[:, -1])
    return seq, torch.stack(logits[:-1], dim=1), history


def masked_reference(model, seq, history):
    """The full sequence in one forward where, at each layer, the queries of a forward spanning
    ``[start, stop)`` see only what that layer's cache held before it (per key/value head) and,
    causally, their own span; queries before the first span (the prompt) see all before them."""
    t_len, heads = seq.shape[1], model.config.num_attention_heads
    groups = heads // (getattr(model.config, "num_key_value_heads", None) or heads)
    masks = []
    for layer in range(model.config.num_hidden_layers):
        allowed = torch.tril(torch.ones(t_len, t_len, dtype=torch.bool)).expand(heads, -1, -1).clone()
        for start, stop, positions in history:
            allowed[:, start:stop, :start] = False
            for h in range(heads):
                allowed[h, start:stop, positions[layer][0, h // groups]] = True
        masks.append(torch.zeros(1, heads, t_len, t_len).masked_fill(~allowed, float("-inf")))
    handles = [attn.register_forward_pre_hook(
        lambda mod, args, kwargs, m=masks[i]: (args, {**kwargs, "attention_mask": m}), with_kwargs=True)
        for i, attn in enumerate(kv.attention.attention_modules(model))]
    try:
        return model(seq).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("policy", sorted(SMALL))
def test_evicting_cache_matches_a_full_forward_masked_to_what_it_kept(llama, policy):
    ids, steps = prompt(20), 16
    cache = kv.cache(llama, policy, **SMALL[policy])
    seq, logits, history = step_by_step(llama, ids, cache, steps)
    grows = policy == "snapkv"  # generated tokens are appended after the prompt's budget
    assert all(p.shape[-1] <= 12 + step * grows for step, (_, _, kept) in enumerate(history) for p in kept)
    ref = masked_reference(llama, seq, history)
    torch.testing.assert_close(logits, ref[:, ids.shape[1] - 1: -1], rtol=1e-4, atol=1e-4)
    # the first layer's keys depend only on the token and its position: the stored ones are the
    # full run's at the stored positions (RoPE at the real index; later layers see evicted inputs)
    full = DynamicCache()
    llama(seq, cache=full)
    pos, keys = cache.positions(0), cache.layers[0].keys
    want = full.layers[0].keys.gather(2, pos.unsqueeze(-1).expand(*pos.shape, keys.shape[-1]))
    torch.testing.assert_close(keys, want, rtol=1e-4, atol=1e-5)
    assert pos.shape[-1] < cache.layers[0].seen  # something was evicted


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma", "phi", "gpt2", "opt"])
def test_other_families_exact_at_full_budget_and_correct_when_evicting(family):
    model = tiny_model(family)
    model.set_attn_implementation("eager")
    ids = prompt(20)
    ref = generate(model, ids, DynamicCache())
    assert torch.equal(generate(model, ids, kv.cache(model, "h2o", **FULL["h2o"])).sequences, ref.sequences)
    cache = kv.cache(model, "h2o", **SMALL["h2o"])
    seq, logits, history = step_by_step(model, ids, cache, 6)
    ref = masked_reference(model, seq, history)
    torch.testing.assert_close(logits, ref[:, ids.shape[1] - 1: -1], rtol=1e-4, atol=1e-4)
    assert [la.stored for la in cache.layers] == [12, 12]


@pytest.mark.parametrize("policy", sorted(SMALL))
def test_a_chunk_after_eviction_stays_causal(llama, policy):
    """Several tokens in one forward after the cache evicted: they see the kept entries and,
    causally, each other (the mask offset puts the kept entries before the chunk)."""
    ids, chunk = prompt(20), prompt(6, seed=1)
    cache = kv.cache(llama, policy, **SMALL[policy])
    llama(ids, cache=cache)
    before = [cache.positions(i).clone() for i in range(2)]
    logits = llama(chunk, cache=cache).logits
    seq = torch.cat([ids, chunk], dim=1)
    ref = masked_reference(llama, seq, [(20, 26, before)])
    torch.testing.assert_close(logits, ref[:, 20:], rtol=1e-4, atol=1e-4)
    assert before[0].shape[-1] == 12 and cache.layers[0].seen == 26


def test_h2o_keeps_the_recent_window_and_the_budget(llama):
    cache = kv.cache(llama, "h2o", budget=8, window=2)
    llama(prompt(24), cache=cache)
    for i in range(2):
        pos = cache.positions(i)[0]  # (H, 8)
        assert pos.shape == (2, 8) and pos[:, -2:].tolist() == [[22, 23], [22, 23]]
        assert (pos.diff(dim=-1) > 0).all()  # kept in arrival order


def test_snapkv_bounds_the_prompt_then_appends(llama):
    cache = kv.cache(llama, "snapkv", budget=0.5, observation=4)
    seq, _, _ = step_by_step(llama, prompt(30), cache, 5)
    pos = cache.positions(1)[0]
    assert pos.shape == (2, 15 + 5)  # half of the 30-token prompt, then every generated token
    assert pos[:, 11:].tolist() == [list(range(26, 35))] * 2  # observation window, then new tokens
    assert cache.report().budget == 15


def test_beam_search_reorders_the_kept_positions(llama):
    cache = kv.cache(llama, "h2o", budget=10, window=2)
    out = llama.generate(prompt(16), max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False,
                         cache=cache, pad_token_id=0)
    assert out.shape == (1, 22)
    assert [la.positions.shape for la in cache.layers] == [(3, 2, 10)] * 2
    assert all(la.scores.shape == la.positions.shape for la in cache.layers)


# ---------------------------------------------------------------------------------------------
# pure selections against hand-computed examples


def test_group_query_heads_sums_the_heads_of_a_group():
    attn = torch.tensor([[1., 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]).view(1, 4, 1, 3)  # 4 query heads
    assert group_query_heads(attn, 2).view(2, 3).tolist() == [[5, 7, 9], [17, 19, 21]]  # heads 0+1, 2+3
    assert group_query_heads(attn, 4).view(4, 3).tolist() == attn.view(4, 3).tolist()
    with pytest.raises(ValueError, match="do not group evenly"):
        group_query_heads(attn, 3)


def test_streaming_keep_by_hand():
    assert streaming_keep(10, 2, 5).tolist() == [0, 1, 7, 8, 9]
    assert streaming_keep(4, 2, 5).tolist() == [0, 1, 2, 3]
    assert streaming_keep(6, 0, 3).tolist() == [3, 4, 5]


def test_h2o_keep_by_hand():
    scores = torch.tensor([[[0.9, 0.1, 0.5, 0.3, 0.0, 0.2], [0.1, 0.8, 0.2, 0.7, 0.6, 0.0]]])  # (1, 2, 6)
    # window 1: position 5 stays; two heavy hitters among 0..4, per head
    assert h2o_keep(scores, 3, 1).tolist() == [[[0, 2, 5], [1, 3, 5]]]
    assert h2o_keep(scores, 3, 3).tolist() == [[[3, 4, 5], [3, 4, 5]]]  # all recent
    assert h2o_keep(scores, 6, 1).tolist() == [[list(range(6))] * 2]
    tie = torch.tensor([[[0.5, 0.5, 0.5, 0.1]]])
    assert h2o_keep(tie, 2, 1).tolist() == [[[0, 3]]]  # ties go to the earlier position


def test_h2o_accumulates_attention_over_steps_and_evicts_per_kv_head_by_hand():
    from prunekit.kv.kvcache import KVLayer, _Ledger
    from prunekit.kv.policies import H2O

    layer = KVLayer(H2O(H2OParams(window=1)), 3, _Ledger())
    k = torch.arange(4.).view(1, 1, 4, 1).expand(1, 2, 4, 2).contiguous()  # 2 kv heads; entry i holds i
    layer.update(k, k.clone())
    a = torch.tensor([[1., 0, 0, 0], [.5, .5, 0, 0], [.2, .5, .3, 0], [.1, .2, .3, .4]])  # received: 1.8 1.2 .6 .4
    b = torch.tensor([[1., 0, 0, 0], [.5, .5, 0, 0], [.1, .1, .8, 0], [.1, .1, .7, .1]])  # received: 1.7 .7 1.5 .1
    attn = torch.stack([a, a, b, b]).unsqueeze(0)  # (1, Hq=4, 4, 4): query heads 0, 1 -> kv head 0; 2, 3 -> 1
    layer.attend(attn)
    # kv head 0: [3.6, 2.4, 1.2 | 0.8] keeps heavy 0, 1 and recent 3; kv head 1: [3.4, 1.4, 3.0 | 0.2] keeps 0, 2, 3
    assert layer.positions[0].tolist() == [[0, 1, 3], [0, 2, 3]]
    torch.testing.assert_close(layer.scores[0], torch.tensor([[3.6, 2.4, 0.8], [3.4, 3.0, 0.2]]))
    assert layer.keys[0, :, :, 0].tolist() == [[0., 1, 3], [0, 2, 3]]
    # a decoding step: the new token (position 4) attends to the 3 kept entries and itself
    layer.update(torch.full((1, 2, 1, 2), 4.), torch.full((1, 2, 1, 2), 4.))
    row = torch.tensor([0.1, 0.1, 0.7, 0.1]).expand(1, 4, 1, 4)
    layer.attend(row)
    # kv head 0: [3.8, 2.6, 2.2 | 0.2] keeps 0, 1, 4; kv head 1: [3.6, 3.2, 1.6 | 0.2] keeps 0, 2, 4
    assert layer.positions[0].tolist() == [[0, 1, 4], [0, 2, 4]]
    torch.testing.assert_close(layer.scores[0], torch.tensor([[3.8, 2.6, 0.2], [3.6, 3.2, 0.2]]))
    assert layer.keys[0, :, :, 1].tolist() == [[0., 1, 4], [0, 2, 4]] and layer.stored == 3 and layer.seen == 5


def test_h2o_scores_by_hand_at_the_first_layer():
    from prunekit.kv.kvcache import KVLayer, _Ledger
    from prunekit.kv.policies import H2O

    layer = KVLayer(H2O(H2OParams(window=1)), 3, _Ledger())
    layer.update(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))
    attn = torch.tensor([[1., 0, 0, 0], [.5, .5, 0, 0], [.2, .5, .3, 0], [.1, .2, .3, .4]]).view(1, 1, 4, 4)
    layer.attend(attn)
    # received: [1.8, 1.2, 0.6, 0.4]; window keeps 3, heavy hitters 0 and 1
    assert layer.positions[0, 0].tolist() == [0, 1, 3]
    torch.testing.assert_close(layer.scores[0, 0], torch.tensor([1.8, 1.2, 0.4]))


def test_snapkv_votes_and_keep_by_hand():
    attn = torch.zeros(1, 2, 6, 6)  # 2 query heads on 1 key/value head, 6 prompt tokens, observation 2
    attn[0, 0, 4, :5] = torch.tensor([.1, .5, .1, .1, .2])
    attn[0, 0, 5] = torch.tensor([.3, .1, .0, .4, .1, .1])
    attn[0, 1, 4, :5] = torch.tensor([.0, .0, .6, .2, .2])
    attn[0, 1, 5] = torch.tensor([.0, .2, .1, .1, .3, .3])
    attn[0, :, :4] = 9.0  # earlier queries do not vote
    votes = snapkv_votes(attn, 1, 2, 1, "avg")
    torch.testing.assert_close(votes, torch.tensor([[[.4, .8, .8, .8]]]))  # columns 0..3 over rows 4, 5, both heads
    assert snapkv_keep(votes, 4, 2).tolist() == [[[1, 2, 4, 5]]]  # two votes (ties: earlier) + the window
    pooled_max = snapkv_votes(attn, 1, 2, 3, "max")
    torch.testing.assert_close(pooled_max, torch.tensor([[[.8, .8, .8, .8]]]))
    pooled_avg = snapkv_votes(attn, 1, 2, 3, "avg")  # zero padding counted, as F.avg_pool1d does
    torch.testing.assert_close(pooled_avg, torch.tensor([[[1.2 / 3, 2.0 / 3, 2.4 / 3, 1.6 / 3]]]))
    assert snapkv_keep(pooled_avg, 3, 2).tolist() == [[[2, 4, 5]]]
    two_heads = snapkv_votes(attn, 2, 2, 1, "avg")  # no grouping: one vote per head
    torch.testing.assert_close(two_heads, torch.tensor([[[.4, .6, .1, .5], [.0, .2, .7, .3]]]))


# ---------------------------------------------------------------------------------------------
# magnitude


def naive_magnitude(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    out = x.clone().view(-1, x.shape[-1])
    k = math.floor(sparsity * x.shape[-1] + 0.5)
    for row in out:
        order = sorted(range(row.numel()), key=lambda i: (abs(row[i].item()), i))
        row[order[:k]] = 0
    return out.view_as(x)


def test_magnitude_prune_matches_a_naive_loop():
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0))
    for s in (0.25, 0.5, 0.9):
        assert torch.equal(magnitude_prune(x, s), naive_magnitude(x, s))


@pytest.mark.parametrize("sparsity, window", [(0.5, 0), (0.25, 3), (0.75, 0)])
def test_magnitude_zeroes_an_exact_fraction_of_every_cached_vector(llama, sparsity, window):
    cache = kv.cache(llama, "magnitude", sparsity=sparsity, window=window)
    generate(llama, prompt(12), cache, n=6)
    d = llama.config.hidden_size // llama.config.num_attention_heads
    for layer in cache.layers:
        assert layer.keys.shape[-2] == layer.seen == 17  # the cache keeps its length
        for x in (layer.keys, layer.values):
            zeros = (x == 0).sum(-1)  # (B, H, n)
            assert (zeros[..., : 17 - window] == round(sparsity * d)).all()
            assert (zeros[..., 17 - window:] == 0).all()
    report = cache.report()
    assert report.kept_bytes == report.full_bytes and report.saved == 0.0  # dense storage saves nothing
    assert report.zero_fraction == pytest.approx(sparsity * (17 - window) / 17)
    assert report.sparse_bytes < report.full_bytes
    assert "estimate" in str(report) and "saves nothing" in str(report)


def test_report_is_consistent(llama):
    cache = kv.cache(llama, "h2o", budget=10, window=2)
    generate(llama, prompt(20), cache, n=4)
    r = cache.report()
    layer = cache.layers[0]
    token_bytes = 2 * 2 * 16 * 4  # keys + values, 2 heads, head_dim 16, fp32
    assert r.tokens == 23 and r.kept == [10, 10] and r.budget == 10
    assert r.full_bytes == 2 * 23 * token_bytes and r.kept_bytes == 2 * 10 * token_bytes
    assert r.peak_bytes == 10 * token_bytes + 20 * token_bytes  # one layer held its whole prompt
    assert r.saved == pytest.approx(1 - 10 / 23) and r.overhead_bytes == 2 * (layer.positions.nbytes + 2 * 10 * 4)
    assert r.as_dict()["saved"] == r.saved


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("budget", [0.0, 1.5, -0.25, float("nan")])
def test_fraction_outside_zero_one(llama, budget):
    with pytest.raises(ConfigError, match=r"fraction of the prompt must lie in \(0, 1\]"):
        kv.cache(llama, "streaming", budget=budget)


@pytest.mark.parametrize("budget", [0, -3, True, "256"])
def test_budget_not_a_count(llama, budget):
    with pytest.raises(ConfigError, match="budget"):
        kv.cache(llama, "h2o", budget=budget)


def test_budget_below_sink_plus_window(llama):
    with pytest.raises(ConfigError, match=r"budget=10 is below sink \+ window = 4 \+ 8 = 12"):
        kv.cache(llama, "streaming", budget=10, window=8)
    with pytest.raises(ConfigError, match="below window = 32"):
        kv.cache(llama, "h2o", budget=16)
    with pytest.raises(ConfigError, match="below observation = 32"):
        kv.cache(llama, "snapkv", budget=16)
    cache = kv.cache(llama, "h2o", budget=0.1, window=8)  # a fraction resolves on the prompt: 2 tokens
    with pytest.raises(ConfigError, match=r"budget=0.1 \(2 tokens\) is below window = 8"):
        llama(prompt(20), cache=cache)


def test_budget_missing_or_meaningless(llama):
    with pytest.raises(ConfigError, match="needs a budget"):
        kv.cache(llama, "h2o")
    assert kv.cache(llama, "streaming", sink=2, window=6).layers[0].budget == 8
    with pytest.raises(ConfigError, match="keeps every token.*sparsity="):
        kv.cache(llama, "magnitude", budget=64)


def test_bad_policy_or_params(llama):
    with pytest.raises(ConfigError, match="unknown KV policy 'lru'.*h2o"):
        kv.cache(llama, "lru", budget=8)
    with pytest.raises(ConfigError, match="no parameter windw; it takes: window"):
        kv.cache(llama, "h2o", budget=64, windw=4)
    with pytest.raises(ConfigError, match="kernel must be odd"):
        SnapKVParams(kernel=4)
    with pytest.raises(ConfigError, match=r"sparsity must lie in \[0, 1\)"):
        kv.cache(llama, "magnitude", sparsity=1.0)


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_attention_probabilities_unavailable(policy):
    model = tiny_model("llama")  # sdpa
    with pytest.raises(kv.NeedsEagerAttention, match='attn_implementation="eager".*set_attn_implementation'):
        kv.cache(model, policy, budget=64, **({"window": 4} if policy == "h2o" else {"observation": 4}))


def test_attention_switched_away_after_the_cache_was_made():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    cache = kv.cache(model, "h2o", budget=64, window=4)
    model.set_attn_implementation("sdpa")
    with pytest.raises(kv.NeedsEagerAttention, match="returned no attention probabilities"):
        model(prompt(8), cache=cache)
    cache.close()
    model(prompt(8), cache=DynamicCache())  # no hook left behind
    with pytest.raises(ConfigError, match="was closed"):
        model(prompt(8), cache=cache)


def test_scoring_cache_on_another_model_is_refused(llama):
    other = tiny_model("llama", seed=1)
    other.set_attn_implementation("eager")
    cache = kv.cache(llama, "h2o", budget=8, window=2)
    other(prompt(12), cache=cache)  # its attention never reaches the policy
    with pytest.raises(ConfigError, match="no attention probabilities for the last forward"):
        other(prompt(1), cache=cache)


def test_non_decoder_models():
    import transformers as tf

    bert = tf.BertModel(tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="not a generative decoder.*AutoModelForCausalLM"):
        kv.cache(bert, "streaming", budget=8)
    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                   num_heads=2))
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        kv.cache(t5, "streaming", budget=8)
    with pytest.raises(UnsupportedModelError, match="sliding_attention"):
        kv.cache(tiny_model("mistral"), "streaming", budget=8)
    with pytest.raises(UnsupportedModelError, match="no Hugging Face config"):
        kv.cache(torch.nn.Linear(2, 2), "streaming", budget=8)


def test_padded_batch_and_rollback_refused(llama):
    ids = prompt(10, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pytest.raises(ConfigError, match="padded batch"):
        llama.generate(ids, attention_mask=mask, max_new_tokens=2, cache=kv.cache(llama, "streaming", budget=8),
                       pad_token_id=0)
    llama.generate(ids, attention_mask=mask, max_new_tokens=2, cache=kv.cache(llama, "magnitude"),
                   pad_token_id=0)  # no eviction: padding is fine
    cache = kv.cache(llama, "streaming", budget=8)
    llama(ids, cache=cache)
    cache.crop(0)
    with pytest.raises(ConfigError, match="cannot be rolled back"):
        cache.crop(-1)


def test_hooks_only_act_on_their_own_cache():
    llama = tiny_model("llama")
    llama.set_attn_implementation("eager")
    ids = prompt(20)
    ref = llama(ids, cache=DynamicCache()).logits
    cache = kv.cache(llama, "h2o", budget=8, window=2)
    assert torch.equal(llama(ids, cache=DynamicCache()).logits, ref)  # another cache: untouched
    assert cache.layers[0].seen == 0
    del cache
    import gc

    gc.collect()
    assert not any(m._forward_hooks for m in kv.attention.attention_modules(llama))  # gone with the cache
    assert not llama._forward_pre_hooks


# ---------------------------------------------------------------------------------------------
# real model


@pytest.mark.slow
def test_planted_fact_retrieval_on_smollm2(smol_tokenizer, capsys):
    import prunekit

    model = prunekit.load("default").model
    model.set_attn_implementation("eager")
    tok = smol_tokenizer
    text = (ASSETS / "stdlib_docstrings.eval.txt").read_text()
    filler = tok(text, add_special_tokens=False).input_ids[:1200]
    head = tok("The secret code is 7421. Remember it.\n\n", add_special_tokens=False).input_ids
    tail = tok("\n\nThe secret code is", add_special_tokens=False).input_ids
    ids = torch.tensor([head + filler + tail])
    want = tok(" 7421", add_special_tokens=False).input_ids
    runs = {"full": None, "streaming": dict(budget=128), "h2o": dict(budget=128, window=32),
            "snapkv": dict(budget=128, observation=32), "magnitude": dict(sparsity=0.5)}
    found = {}
    for name, kw in runs.items():
        cache = DynamicCache() if kw is None else kv.cache(model, name, **kw)
        out = model.generate(ids, max_new_tokens=len(want), do_sample=False, cache=cache, pad_token_id=0)
        found[name] = out[0, ids.shape[1]:].tolist() == want
        if kw is not None:
            r = cache.report()
            assert r.tokens == ids.shape[1] + len(want) - 1 and r.full_bytes >= r.kept_bytes > 0
            assert r.kept == [r.kept[0]] * model.config.num_hidden_layers
            if name != "magnitude":
                assert r.kept[0] <= 128 + (len(want) - 1 if name == "snapkv" else 0)
            print(name, "retrieved" if found[name] else "lost", "|", r)
            cache.close()
    assert found["full"], "the unpruned model must retrieve the planted fact"
    with capsys.disabled():
        print(f"\nplanted fact over {ids.shape[1]} tokens, budget 128: {found}")
