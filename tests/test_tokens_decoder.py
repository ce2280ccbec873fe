"""Prompt-token pruning in decoders (FastV, DivPrune, random): the selectors against hand
computations and a naive loop; on real transformers causal LMs (tiny random weights), keep 1.0
reproducing the unpruned logits and generations bit for bit, a cut prompt and its continuation
through the KV cache equal to a masked full forward (the dropped tokens hidden from the later
layers), the caches and positions that make ``generate`` continue, reports and every error;
on real SmolLM2 (slow), the same exactness and a continuation perplexity against the uncut one.

prunekit.tokens is imported by the ``tk`` fixture (see tests/test_tokens.py for why).
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from conftest import DEVICES
from prunekit.models.tiny import tiny_causal_lm
from prunekit.errors import ConfigError, UnsupportedModelError

DECODER = ["divprune", "fastv", "random"]


@pytest.fixture(scope="module")
def tk():
    return importlib.import_module("prunekit.tokens")


def causal_lm(family: str = "llama", impl: str = "eager", seed: int = 0):
    model = tiny_causal_lm(family, seed=seed)
    model.config.use_cache = True
    model.generation_config.use_cache = True
    model.generation_config.pad_token_id = 0
    model.set_attn_implementation(impl)
    return model.eval()


def prompt(b: int = 2, n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 200, (b, n), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------- pure selectors


def test_fastv_keeps_the_last_token_and_the_most_attended(tk):
    score = torch.tensor([[0.10, 0.40, 0.05, 0.30, 0.15],
                          [0.30, 0.30, 0.20, 0.10, 0.10]])
    assert tk.fastv_keep(score, 3).tolist() == [[1, 3, 4], [0, 1, 4]]  # ties to the earlier token
    assert tk.fastv_keep(score, 1).tolist() == [[4], [4]] and tk.fastv_keep(score, 5).tolist() == [[0, 1, 2, 3, 4]] * 2
    attn = torch.rand(2, 3, 4, 5).softmax(-1)  # (B, H, q, N)
    torch.testing.assert_close(tk.last_token_attention(attn), attn[:, :, -1].mean(1))
    with pytest.raises(ConfigError, match="1 <= k <= 5"):
        tk.fastv_keep(score, 0)


def naive_divprune(x: torch.Tensor, k: int) -> list[int]:
    """The greedy max-min selection for one row, with explicit loops over Python floats."""
    n = x.shape[0]
    unit = [v / v.norm() for v in x.double()]
    dist = [[1.0 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    picked = [n - 1]
    while len(picked) < k:
        gains = [(min(dist[i][j] for j in picked), -i) for i in range(n) if i not in picked]
        picked.append(-max(gains)[1])
    return sorted(picked)


@pytest.mark.parametrize("k", [1, 2, 5, 9, 12])
def test_divprune_matches_a_naive_greedy(tk, k):
    x = torch.randn(3, 12, 6, generator=torch.Generator().manual_seed(k))
    got = tk.divprune_keep(x, k)
    assert got.tolist() == [naive_divprune(x[b], k) for b in range(3)]


def test_divprune_spreads_over_clusters(tk):
    """Three tight clusters of tokens: three picks take one from each, where the top three by
    any single direction would not."""
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 8) * 5
    x = torch.cat([centres[i] + 0.01 * torch.randn(4, 8, generator=g) for i in (0, 1, 2)])[None]  # (1, 12, 8)
    kept = tk.divprune_keep(x, 3)[0].tolist()
    assert sorted(i // 4 for i in kept) == [0, 1, 2] and 11 in kept


def test_random_prompt_keep(tk):
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a, b = tk.random_prompt_keep(4, 30, 10, g()), tk.random_prompt_keep(4, 30, 10, g())
    assert torch.equal(a, b) and a.shape == (4, 10) and (a[:, -1] == 29).all()
    assert all(len(set(row)) == 10 and row == sorted(row) for row in a.tolist())
    counts = torch.bincount(tk.random_prompt_keep(4000, 30, 10, g())[:, :-1].flatten(), minlength=29)[:29]
    assert counts.min() > 0.8 * counts.float().mean() and counts.max() < 1.2 * counts.float().mean()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", DECODER)
def test_every_prompt_selector_contract(tk, method, dtype, device):
    """Every decoder entry: (B, k) sorted distinct indices with the last token, on the input's
    device, repeating under a seed."""
    entry = tk.TOKEN_METHODS.get(method)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 8, generator=g).to(device=device, dtype=dtype)
    attn = torch.rand(3, 17, generator=g).softmax(-1).to(device)
    for k in (1, 6, 17):
        def run():
            return entry.select(tk.PromptTokens(x, k, attn, torch.Generator(device=device).manual_seed(0)))
        idx = run()
        assert idx.shape == (3, k) and idx.device == x.device and not idx.is_floating_point()
        assert (idx[:, -1] == 16).all() and (idx[:, 1:] > idx[:, :-1]).all()
        assert torch.equal(run(), idx)


def test_registry_kinds(tk):
    kinds = {n: tk.TOKEN_METHODS.get(n).kinds for n in tk.TOKEN_METHODS.names()}
    assert kinds == {"divprune": ("decoder",), "evit": ("encoder",), "fastv": ("decoder",),
                     "random": ("encoder", "decoder"), "tome": ("encoder",)}
    assert tk.TOKEN_METHODS.info("fastv").citation == "Chen et al. 2024 (FastV)"
    assert tk.TOKEN_METHODS.info("divprune").citation == "Alvar et al. 2025 (DivPrune)"
    assert all(tk.TOKEN_METHODS.info(n).description for n in ("fastv", "divprune"))


# ------------------------------------------------------------------------- real causal LMs


def masked_reference(model, ids: torch.Tensor, kept: torch.Tensor, n: int, after: int) -> torch.Tensor:
    """Logits of one forward over ``ids`` (prompt of ``n`` tokens + continuation) where the first
    ``after`` layers see the whole causal past and the later ones have the prompt tokens not in
    ``kept`` masked out of every query's view: what a cut computes, without cutting anything."""
    from prunekit.models.decoder import find_blocks

    b, total = ids.shape
    see = torch.ones(total, total, dtype=torch.bool).tril().expand(b, -1, -1).clone()  # (B, L, L)
    dropped = torch.ones(b, total, dtype=torch.bool)
    dropped[:, n:] = False
    dropped.scatter_(1, kept, False)
    see &= ~dropped[:, None, :]
    see |= torch.eye(total, dtype=torch.bool)  # a dropped token's own row stays defined; nothing reads it
    bias = torch.zeros(b, 1, total, total).masked_fill(~see[:, None], torch.finfo(torch.float32).min)
    layers = find_blocks(model)[1]

    def use_bias(module, args, kwargs):
        return args, {**kwargs, "attention_mask": bias}

    hooks = [layers[i].register_forward_pre_hook(use_bias, with_kwargs=True) for i in range(after, len(layers))]
    try:
        with torch.no_grad():
            return model(ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("method", DECODER)
def test_keep_one_is_exact_and_remove_restores(tk, method, impl):
    if method == "fastv" and impl == "sdpa":
        pytest.skip("fastv needs eager attention (its refusal is tested below)")
    model, ids = causal_lm(impl=impl), prompt()
    with torch.no_grad():
        ref = model(ids).logits
        gen = model.generate(ids, max_new_tokens=8, do_sample=False)
        for after in (0, 2):
            if method == "fastv" and after == 0:
                continue
            with tk.prune(model, method, keep=1.0, after=after) as h:
                assert torch.equal(model(ids).logits, ref)
                assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), gen)
                assert h.report().tokens_in == (24,) * 4
        assert not hasattr(model, "_prunekit_tokens") and torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt_neox", "opt"])
@pytest.mark.parametrize("method,after", [("fastv", 2), ("divprune", 0), ("divprune", 2), ("random", 1)])
def test_cut_prompt_and_continuation_equal_a_masked_forward(tk, family, method, after):
    """The cut prefill's last logits and the logits of a continuation through its cache equal a
    full forward that hides the dropped tokens from the later layers; the caches hold the whole
    prompt before the cut and the kept tokens after it."""
    model, ids = causal_lm(family), prompt(n=20)
    more = prompt(n=5, seed=1)
    with torch.no_grad(), tk.prune(model, method, keep=0.4, after=after) as h:
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        kept = h.cut(cache)
        assert kept.shape == (2, 9) and (kept[:, -1] == 19).all()  # 20 - round(0.6 * 19) = 9
        lengths = [cache.layers[i].keys.shape[-2] for i in range(4)]
        assert lengths == [20 if i < after else 9 for i in range(4)]
        assert cache.get_seq_length() == 20
        cont = model(more, cache=cache).logits  # (B, 5, V)
    ref = masked_reference(model, torch.cat([ids, more], 1), kept, 20, after)
    torch.testing.assert_close(out.logits[:, -1], ref[:, 19], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cont, ref[:, 20:], rtol=1e-4, atol=1e-5)
    assert (out.logits[:, -1] - model(ids).logits[:, -1]).abs().max() > 1e-4  # the cut changed something


@pytest.mark.parametrize("after", [0, 1])
def test_generate_continues_from_a_cut_prompt(tk, after):
    """generate after a cut prefill produces what greedy decoding through the cut cache does,
    one token at a time, with positions counting every prompt token."""
    model, ids = causal_lm(), prompt(b=1, n=30)
    with torch.no_grad(), tk.prune(model, "divprune", keep=0.5, after=after):
        gen = model.generate(ids, max_new_tokens=6, do_sample=False)
        out = model(ids, use_cache=True)
        cache, token, steps = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        for _ in range(6):
            steps.append(token)
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)
        assert cache.get_seq_length() == 36 and cache.layers[3].keys.shape[-2] == 15 + 6
    assert torch.equal(gen[:, 30:], torch.cat(steps, 1))


def test_report_counts_tokens_and_macs_and_times_the_prefill(tk):
    model, ids = causal_lm(), prompt(b=1, n=64)
    with tk.prune(model, "random", keep=0.25, after=1) as h:
        rep = h.report(ids, repeats=3, warmup=1)
    assert rep.tokens_in == (64, 17, 17, 17) and rep.tokens_out == (17, 17, 17, 17)
    full = h.layer_macs(64)
    assert rep.dense_macs == full and rep.macs[0] == full[0] and rep.macs[1] == h.layer_macs(17)[1]
    linear = sum(m.weight.numel() for m in h.layers[0].modules() if isinstance(m, torch.nn.Linear))
    assert full[0] == 64 * linear + 2 * 64 * 64 * h.layers[0].self_attn.q_proj.out_features
    assert 0.25 < rep.macs_ratio < 0.6 and rep.latency_ms > 0 and rep.dense_latency_ms > 0


# ------------------------------------------------------------------------- errors


def test_decoder_errors_name_the_fix(tk):
    model = causal_lm()
    with pytest.raises(ConfigError, match=r"outside \(0, 1\]"):
        tk.apply(model, "fastv", keep=1.5)
    with pytest.raises(ConfigError, match="give keep="):
        tk.apply(model, "fastv", r=4)
    with pytest.raises(ConfigError, match="give keep="):
        tk.apply(model, "divprune", keep=0.5, layers=[1])
    with pytest.raises(ConfigError, match="after=-1 must be an integer >= 0"):
        tk.apply(model, "fastv", keep=0.5, after=-1)
    with pytest.raises(ConfigError, match="has 4 layers; use 0 to 3"):
        tk.apply(model, "random", keep=0.5, after=4)
    with pytest.raises(ConfigError, match="after >= 1"):
        tk.apply(model, "fastv", keep=0.5, after=0)
    with pytest.raises(ConfigError, match="is an encoder method"):
        tk.TokenStage("tome", r=2, after=1)
    with pytest.raises(UnsupportedModelError, match="is a decoder.*fastv, divprune or random"):
        tk.apply(model, "evit", keep=0.5)
    with pytest.raises(UnsupportedModelError, match='attn_implementation="eager"'):
        tk.apply(causal_lm(impl="sdpa"), "fastv", keep=0.5)
    with tk.prune(model, "random", keep=0.5):
        with pytest.raises(ConfigError, match="already applied"):
            tk.apply(model, "divprune", keep=0.5)
        with pytest.raises(ConfigError, match="padded batch"):
            model(prompt(), attention_mask=torch.tensor([[1] * 24, [0] * 4 + [1] * 20]))
    assert not hasattr(model, "_prunekit_tokens")


def test_models_a_cut_cannot_follow_are_refused(tk):
    import transformers as tf

    with pytest.raises(UnsupportedModelError, match="sliding_attention layers.*prompt-token pruning"):
        tk.apply(causal_lm("mistral"), "random", keep=0.5)
    with pytest.raises(UnsupportedModelError, match="'alibi'"):
        tk.apply(causal_lm("bloom"), "random", keep=0.5, after=1)
    gpt2 = causal_lm("gpt2")
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel fails when its prompt is cut"):
        tk.apply(gpt2, "random", keep=0.5, after=1)
    assert not hasattr(gpt2, "_prunekit_tokens") and not gpt2._forward_pre_hooks
    encoder = tf.BertModel(tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="not a generative decoder"):
        tk.apply(encoder, "fastv", keep=0.5)
    with pytest.raises(UnsupportedModelError, match="not a generative decoder"):
        tk.apply(encoder, "random", keep=0.5, after=1)


# ------------------------------------------------------------------------- real SmolLM2


@pytest.mark.slow
def test_smollm2_prompt_cut(tk, smol_dir, smol_tokenizer, calib_text):
    """Real SmolLM2-135M on real text: keep 1.0 generates the unpruned text; at keep 0.5 the
    continuation perplexity after the cut equals the masked forward's and stays near the uncut
    one (within 1.5x), and FastV beats the random control."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smol_dir, attn_implementation="eager").eval()
    ids = smol_tokenizer(calib_text[:6000], return_tensors="pt").input_ids[:, :640]
    p, more = ids[:, :512], ids[:, 512:]

    def continuation_ppl(method=None, keep=1.0):
        with torch.no_grad():
            if method is None:
                out = model(p, use_cache=True)
                logits = model(more, cache=out.past_key_values).logits
                kept = None
            else:
                with tk.prune(model, method, keep=keep, after=2) as h:
                    out = model(p, use_cache=True)
                    kept = h.cut(out.past_key_values)
                    logits = model(more, cache=out.past_key_values).logits
        logits = torch.cat([out.logits[:, -1:], logits[:, :-1]], 1)  # predictions of every token of `more`
        return math.exp(torch.nn.functional.cross_entropy(logits[0].float(), more[0]).item()), kept

    with torch.no_grad():
        gen = model.generate(p[:, :200], max_new_tokens=20, do_sample=False)
        with tk.prune(model, "fastv", keep=1.0, after=2):
            assert torch.equal(model.generate(p[:, :200], max_new_tokens=20, do_sample=False), gen)
    dense, _ = continuation_ppl()
    fastv, kept = continuation_ppl("fastv", 0.5)
    random, _ = continuation_ppl("random", 0.5)
    ref = masked_reference(model, ids, kept, 512, 2)
    masked = math.exp(torch.nn.functional.cross_entropy(ref[0, 511:-1].float(), more[0]).item())
    assert abs(fastv - masked) / masked < 1e-3
    assert fastv < 1.5 * dense and fastv < random, (dense, fastv, random)


# ------------------------------------------------------------------------- the recipe stage

RECIPE = """
calibration: {text: default, nsamples: 6, seqlen: 48, batch_size: 2}
stages:
  - weights: {method: wanda, sparsity: 0.5}
  - tokens: {method: divprune, keep: 0.5, after: 1}
"""


def test_tokens_stage_reads_writes_and_must_come_last(tk):
    from prunekit.recipe import Recipe

    recipe = Recipe.from_yaml(RECIPE)
    stage = recipe.stages[-1]
    assert stage == tk.TokenStage("divprune", keep=0.5, after=1)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert recipe.to_dict()["stages"][-1] == {"tokens": {"method": "divprune", "keep": 0.5, "seed": 0, "after": 1}}
    with pytest.raises(ConfigError, match=r"stage 1 \(tokens\) must be the last stage"):
        Recipe.from_yaml("stages: [{tokens: {method: tome, r: 2}}, {weights: {method: wanda}}]")
    with pytest.raises(ConfigError, match=r"stage 1 \(tokens\): unknown keys \['kept'\]"):
        Recipe.from_yaml("stages: [{tokens: {method: tome, kept: 0.5}}]")
    with pytest.raises(ConfigError, match=r"stage 1 \(tokens\).*outside \(0, 1\]"):
        Recipe.from_yaml("stages: [{tokens: {method: fastv, keep: 2}}]")


def test_prunekit_run_with_a_tokens_stage(capsys, tiny_llama_dir, tmp_path, tk):
    """The CLI runs weights then tokens: the stage reports tokens, MACs, prefill latency and the
    continuation perplexity cut and uncut (recomputed here), --eval runs with the cut off, and
    the saved recipe re-applies the cut after load."""
    import prunekit
    from conftest import last_json, run_cli
    from prunekit.tokens.quality import continuation_perplexity

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    code, out, err = run_cli(capsys, "run", recipe, tiny_llama_dir, "--output", tmp_path / "o", "--json", "--quiet",
                             "--eval", "default", "--eval-max-tokens", 96)
    assert code == 0, err
    rep = last_json(out)
    tokens = rep["stages"][-1]
    assert tokens["kind"] == "tokens" and tokens["tokens_in"] == [48, 24]  # 48 - round(0.5 * 47) = 24
    assert tokens["macs_ratio"] < 1 and tokens["latency_ms"] > 0 and rep["perplexity"] > 1
    assert tokens["prompt_tokens"] == 24 and tokens["windows"] == 4
    loaded = prunekit.load(tmp_path / "o")
    assert loaded.recipe.stages[-1] == tk.TokenStage("divprune", keep=0.5, after=1)
    assert tk.applied(loaded.model) is None
    handle = tk.apply(loaded.model, loaded.recipe.stages[-1])
    windows = prunekit.calibration.CalibrationData.from_text(loaded.tokenizer, "default", 6, 48, 0, 2).ids
    again = continuation_perplexity(handle, windows[-4:])
    assert again["continuation_perplexity"] == pytest.approx(tokens["continuation_perplexity"], rel=1e-4)
    assert again["uncut_continuation_perplexity"] == pytest.approx(tokens["uncut_continuation_perplexity"], rel=1e-4)
    assert again["continuation_perplexity"] != again["uncut_continuation_perplexity"]
    assert tk.remove(loaded.model) and tk.applied(loaded.model) is None


def test_a_fastv_stage_switches_the_cli_model_to_eager_attention(capsys, tiny_llama_dir, tmp_path, tk):
    """The CLI loads models with SDPA; a fastv stage needs the probabilities, so the run switches
    to eager attention and says so in the stage report."""
    from conftest import last_json, run_cli

    recipe = tmp_path / "fastv.yaml"
    recipe.write_text("calibration: {text: default, nsamples: 4, seqlen: 48, batch_size: 2}\n"
                      "stages: [{tokens: {method: fastv, keep: 0.5, after: 1}}]\n")
    code, out, err = run_cli(capsys, "run", recipe, tiny_llama_dir, "--output", tmp_path / "o", "--json", "--quiet")
    assert code == 0, err
    stage = last_json(out)
    assert stage["method"] == "fastv" and stage["tokens_in"] == [48, 24]
    assert stage["continuation_perplexity"] != stage["uncut_continuation_perplexity"]
    assert stage["attn_implementation"].startswith("sdpa -> eager")


def test_tokens_stage_report_on_an_encoder(tk):
    """On an encoder the stage reports the cosine of mean embeddings, recomputed here by hand."""
    import transformers as tf
    import torch.nn.functional as F

    from prunekit.calibration import CalibrationData
    from prunekit.tokens.report import stage_report

    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                       intermediate_size=64)).eval()
    ids = torch.randint(5, 300, (4, 20), generator=torch.Generator().manual_seed(1))
    with tk.prune(model, "tome", r=4) as handle:
        rep = stage_report(handle, CalibrationData.from_ids(ids, 2), windows=4, repeats=2)
        with torch.no_grad():
            cut = model(input_ids=ids).last_hidden_state
            sizes = handle.sizes
            with handle.disabled():
                dense = model(input_ids=ids).last_hidden_state
    expected = F.cosine_similarity(tk.weighted_mean(cut, sizes), dense.mean(1), dim=-1).mean()
    assert rep["embedding_cosine"] == pytest.approx(float(expected), rel=1e-5) and rep["embedding_cosine"] < 1
    assert tuple(rep["tokens_out"]) == (16, 12, 12) and rep["r"] == 4 and "continuation_perplexity" not in rep
