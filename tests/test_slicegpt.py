"""SliceGPT (Ashkboos et al. 2024) as prunekit's width pruning: exact at ratio 0, the hidden size
and parameter count after slicing, save + reload, the CLI contract, errors, and (slow) perplexity
on the real SmolLM2 against the unit-score width pruning."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import prunekit
from conftest import last_json, run_cli, tiny_model
from prunekit.calibration import CalibrationData, RunOptions
from prunekit.errors import ConfigError, UnsupportedModelError
from prunekit.structural import StructureConfig
from prunekit.structural.prune import prune_structure
from prunekit.structural.slicegpt import kept_width, principal_basis, prune_slicegpt, rotate_reader, rotate_writer

V, D, I, H, KV, HD, L = 256, 64, 128, 4, 2, 16, 2


def tiny_llama(tied: bool, seed: int = 0) -> tf.LlamaForCausalLM:
    """Hidden 64, 2 layers, with random norm weights (so folding them is tested)."""
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=L,
                         num_attention_heads=H, num_key_value_heads=KV, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def ids(n: int = 8, t: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def slicegpt(ratio: float, **kw) -> StructureConfig:
    return StructureConfig.create("width", ratio, "slicegpt", **kw)


def sliced_params(d: int, tied: bool) -> int:
    """Parameters of the sliced tiny Llama by hand: (d, d) shortcuts in every layer; a tied head
    stays tied and the final norm gains one (d, d) matrix, an untied head is (V, d)."""
    attn = d * H * HD + 2 * d * KV * HD + H * HD * d
    mlp = 3 * d * I
    per_layer = attn + mlp + 2 * d + 2 * d * d
    return V * d + L * per_layer + d + (d * d if tied else V * d)


def test_helpers_by_hand():
    cov = torch.diag(torch.tensor([1.0, 9.0, 4.0], dtype=torch.float64))
    values, vectors = principal_basis(cov)
    assert values.tolist() == [9.0, 4.0, 1.0]
    assert torch.equal(vectors.abs(), torch.eye(3, dtype=torch.float64)[:, [1, 2, 0]])
    w = torch.arange(6.0).view(2, 3)  # (out, D)
    q = torch.eye(3, dtype=torch.float64)[:, :2]  # keep the first two directions
    assert torch.equal(rotate_reader(w, q), w[:, :2])
    assert torch.equal(rotate_writer(w.T.contiguous(), q), w.T[:2])
    assert kept_width(64, 0.25) == 48 and kept_width(64, 0.0) == 64 and kept_width(576, 0.25) == 432
    assert kept_width(64, 0.3, round_to=8) == 48


@pytest.mark.parametrize("tied", [True, False])
def test_ratio_zero_is_exact(tied):
    model = tiny_llama(tied)
    x = ids()
    with torch.no_grad():
        ref = model(x[:2]).logits
    result = prune_slicegpt(model, slicegpt(0.0), CalibrationData.from_ids(x, batch_size=4), RunOptions())
    with torch.no_grad():
        out = model(x[:2]).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert result.report["hidden_after"] == D and result.report["exact"]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied and model.config.tie_word_embeddings == tied
    assert hasattr(model.model.norm, "head_shortcut") == tied
    for layer in model.model.layers:  # rotated, not identity, but orthogonal
        s = layer.attn_shortcut.double()
        torch.testing.assert_close(s @ s.T, torch.eye(D, dtype=torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_quarter_shrinks_hidden_to_48(tied):
    model = tiny_llama(tied)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
    result = prunekit.prune(model, slicegpt(0.25), x, progress=False)
    rep = result.report
    assert model.model.embed_tokens.weight.shape == (V, 48) and model.lm_head.weight.shape == (V, 48)
    for layer in model.model.layers:
        assert layer.self_attn.q_proj.weight.shape == (H * HD, 48) and layer.self_attn.o_proj.weight.shape == (48, 64)
        assert layer.mlp.down_proj.weight.shape == (48, I) and layer.attn_shortcut.shape == (48, 48)
        assert layer.input_layernorm.weight.shape == (48,)
    assert model.config.hidden_size == 48 and model.config.head_dim == HD
    assert rep["params_after"] == sliced_params(48, tied) == sum(p.numel() for p in model.parameters())
    assert rep["params_after"] < rep["params_before"] * 1.0 and rep["units_removed"] == 16
    assert rep["ratio_achieved"] == 0.25 and rep["method"] == "slicegpt" and rep["structure"] == "width"
    with torch.no_grad():
        out = model(x).logits
    assert torch.isfinite(out).all()
    # an approximation, far closer than dropping the same 16 raw hidden dims would be
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.9


def test_untied_params_fall_in_proportion():
    """Untied, every hidden-sized dimension loses a quarter; the shortcuts add 2 d^2 per layer."""
    model = tiny_llama(False)
    before = sum(p.numel() for p in model.parameters())
    prunekit.prune(model, slicegpt(0.25), ids(), progress=False)
    after = sum(p.numel() for p in model.parameters())
    assert after == sliced_params(48, False)
    assert after - L * 2 * 48 * 48 < 0.8 * before


@pytest.mark.parametrize("tied", [True, False])
def test_save_and_reload_same_outputs(tmp_path, tied):
    model = tiny_llama(tied)
    x = ids()
    result = prunekit.prune(model, slicegpt(0.25), x, progress=False)
    with torch.no_grad():
        out = model(x[:2]).logits
    result.save(tmp_path / "sliced")
    back = prunekit.load(str(tmp_path / "sliced"))
    assert type(back.model.model.layers[0]).__name__ == "SlicedLlamaDecoderLayer"
    assert back.recipe.stages[0].method == "slicegpt"
    with torch.no_grad():
        torch.testing.assert_close(back.model(x[:2]).logits, out, rtol=0, atol=0)
    assert (back.model.lm_head.weight is back.model.model.embed_tokens.weight) == tied  # a tied head stays tied
    norm = back.model.model.norm
    assert type(norm).__name__ == ("SlicedLlamaRMSNorm" if tied else "LlamaRMSNorm")
    assert not tied or norm.head_shortcut.shape == (48, 48)
    twin = copy.deepcopy(back.model)  # still a plain module tree: copies and runs
    with torch.no_grad():
        torch.testing.assert_close(twin(x[:2]).logits, out, rtol=0, atol=0)


def test_cli_contract_and_reload(capsys, tiny_llama_dir, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "prune", tiny_llama_dir, "--structure", "width", "--method", "slicegpt",
                             "--ratio", 0.25, "--nsamples", 4, "--seqlen", 32, "--output", out_dir, "--json",
                             "--quiet")
    assert code == 0, err
    rep = last_json(out)
    assert rep["structure"] == "width" and rep["method"] == "slicegpt" and rep["ratio"] == 0.25
    assert rep["params_after"] > 0 and rep["units_removed"] == 16
    code, out, err = run_cli(capsys, "eval", out_dir, "--seqlen", 32, "--max-tokens", 256, "--json", "--quiet")
    assert code == 0, err
    assert last_json(out)["tokens"] == 256
    code, out, err = run_cli(capsys, "prune", tiny_llama_dir, "--recipe", out_dir / "prunekit_recipe.yaml",
                             "--output", tmp_path / "again", "--json", "--quiet")
    assert code == 0, err
    assert last_json(out)["params_after"] == rep["params_after"]


@pytest.mark.parametrize("args,message", [
    (["--structure", "neurons", "--ratio", "0.2", "--method", "slicegpt"], "applies to --structure width only"),
    (["--structure", "layers", "--ratio", "0.2", "--method", "slicegpt"], "applies to --structure width only"),
    (["--structure", "width", "--ratio", "1.0", "--method", "slicegpt"], "outside [0, 1)"),
    (["--structure", "width", "--ratio", "0.25", "--method", "slicegpt", "--allocation", "global"],
     "no use for allocation"),
])
def test_cli_errors(capsys, tiny_llama_dir, tmp_path, args, message):
    out_dir = tmp_path / "out"
    code, _, err = run_cli(capsys, "prune", tiny_llama_dir, *args, "--nsamples", 2, "--seqlen", 32,
                           "--output", out_dir)
    assert code == 2 and message in err, err
    assert not out_dir.exists()


def test_unsupported_model_is_named_and_left_alone():
    model = tiny_model("gpt2")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        prune_structure(model, slicegpt(0.25), data=ids())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_ratio_errors():
    with pytest.raises(ConfigError, match="outside"):
        slicegpt(1.0)
    with pytest.raises(ConfigError, match="keeps no dimension"):
        prune_structure(tiny_llama(False), slicegpt(0.999), data=ids())
    with pytest.raises(ConfigError, match="already sliced"):
        model = tiny_llama(False)
        prune_structure(model, slicegpt(0.25), data=ids())
        prune_structure(model, slicegpt(0.25), data=ids())


@pytest.mark.slow
def test_smollm2_slicegpt_beats_unit_width_pruning():
    """25% of SmolLM2-135M's hidden width: SliceGPT's perplexity on held-out text is below the
    width pruning by unit scores (FLAP, the default, and Wanda) at the same ratio."""
    from prunekit.calibration.text import calibration_windows, load_text, tokenize
    from prunekit.evaluate import perplexity
    from prunekit.models.loading import load_model

    model, tok, _ = load_model("default")
    calib = calibration_windows(tokenize(tok, load_text("default", "calib")), 16, 256, 0)
    eval_ids = tokenize(tok, load_text("default", "eval"))[: 16 * 256]
    ppl = {"dense": perplexity(model, eval_ids, 256, progress=False).perplexity}
    for method in ("slicegpt", "flap", "wanda"):
        m = copy.deepcopy(model)
        prune_structure(m, StructureConfig.create("width", 0.25, method), data=calib)
        ppl[method] = perplexity(m, eval_ids, 256, progress=False).perplexity
        del m
    print(ppl)
    assert ppl["slicegpt"] < ppl["flap"] and ppl["slicegpt"] < ppl["wanda"]
    assert ppl["dense"] < ppl["slicegpt"]


def test_plan_sizes_match_the_run():
    model = tiny_llama(False)
    plan = prunekit.plan(prunekit.Recipe((slicegpt(0.25),)), model, ids())
    result = prunekit.prune(copy.deepcopy(model), slicegpt(0.25), ids(), progress=False)
    assert plan.stages[0].params_after == result.report["params_after"]
    assert model.model.embed_tokens.weight.shape == (V, D)  # planning leaves the model alone
