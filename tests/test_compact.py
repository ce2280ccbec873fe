"""Compact checkpoints (--format compact): bit-exact round trips of unstructured, N:M and
structured results, their sizes against the dense files, and corrupted or truncated files."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import prunekit
from conftest import last_json, run_cli, tiny_model
from prunekit import PruneConfig, Recipe, StructureConfig, prune, run
from prunekit.errors import ConfigError, ModelLoadError
from prunekit.models.loading import load_model
from prunekit.export.compact import (COMPACT_META, COMPACT_WEIGHTS, checkpoint_info, decode, encode, nonzero_bits,
                                     pack_bits, unpack_bits)

_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT[t.dtype]) if t.dtype in _INT else t


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(bits(a[name]), bits(b[name])), name


def round_trip(t: torch.Tensor) -> tuple[str, dict, torch.Tensor]:
    kind, parts, extra = encode(t)
    back = decode(kind, lambda key: parts[key[1:]], "w", {"shape": list(t.shape), **extra}, t.dtype)
    return kind, {**parts, **extra}, back


def nm_masked(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    g = w.reshape(w.shape[0], -1, m)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().float().topk(n, -1).indices, True)
    return g.masked_fill(~keep, 0).reshape(w.shape)


def test_bit_packing_by_hand():
    assert pack_bits(torch.tensor([0, 1, 2, 3]), 2).tolist() == [0b00011011]
    assert unpack_bits(pack_bits(torch.tensor([3, 0, 2]), 2), 2, 3).tolist() == [3, 0, 2]
    assert unpack_bits(pack_bits(torch.tensor([7, 1, 4, 0, 5]), 3), 3, 5).tolist() == [7, 1, 4, 0, 5]
    t = torch.tensor([0.0, -0.0, 1.0])
    assert nonzero_bits(t).tolist() == [False, True, True]  # -0.0 is a value: the round trip keeps its sign


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_encodings_are_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g).to(dtype)
    unstructured = w.masked_fill(torch.rand(16, 32, generator=g) < 0.5, 0)
    unstructured[0, 0] = -0.0
    kind, parts, back = round_trip(unstructured)
    assert kind == "sparse" and parts["::values"].numel() == int(nonzero_bits(unstructured).sum())
    assert torch.equal(bits(back), bits(unstructured))
    for n, m in ((2, 4), (1, 4), (2, 8), (4, 8)):
        nm = nm_masked(w, n, m)
        kind, parts, back = round_trip(nm)
        assert torch.equal(bits(back), bits(nm)), (n, m)
        if (n, m) == (4, 8):  # 4 positions of 3 bits per 8 entries: the 8-bit bitmask is smaller
            assert kind == "sparse"
        else:
            assert kind == "nm" and (parts["n"], parts["m"]) == (n, m)
            assert parts["::nm_values"].shape == (16, 32 // m * n)
            assert parts["::nm_index"].numel() == math.ceil(16 * 32 // m * n * math.log2(m) / 8)
    nm = nm_masked(w, 2, 4)
    nm[3, :4] = 0  # a group with fewer than n kept: padded with stored zeros, still N:M
    kind, parts, back = round_trip(nm)
    assert kind == "nm" and torch.equal(bits(back), bits(nm))
    kind, _, back = round_trip(w)  # dense stays dense
    assert kind == "dense" and torch.equal(back, w)


def test_ints_and_empty_tensors():
    for t in (torch.tensor([0, 0, 0, 5] * 64), torch.zeros(0, 4), torch.ones(3, dtype=torch.bool)):
        _, _, back = round_trip(t)
        assert back.dtype == t.dtype and torch.equal(back, t)


def _pruned(config):
    """A tiny Llama with a 256-token vocabulary (so its linears, not its embeddings, hold most bytes)."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    return prune(model, config, ids, progress=False)


def _payload_bytes(directory) -> int:
    with safe_open(str(directory / COMPACT_WEIGHTS), framework="pt") as f:
        return sum(t.numel() * t.element_size() for t in map(f.get_tensor, f.keys()))


@pytest.mark.parametrize("pattern,kind", [("unstructured", "sparse"), ("2:4", "nm")])
def test_pruned_llm_round_trip_and_size(tmp_path, pattern, kind):
    result = _pruned(PruneConfig.from_method("wanda", pattern=pattern))
    dense_dir = result.save(tmp_path / "dense")
    out = result.save(tmp_path / "compact", format="compact")
    assert not (out / "model.safetensors").exists() and (out / COMPACT_META).is_file()
    back = prunekit.load(str(out))
    same_bits(result.model.state_dict(), back.model.state_dict())
    assert back.model.lm_head.weight is not back.model.model.embed_tokens.weight  # untied, as saved
    x = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert torch.equal(back.model(x).logits, result.model(x).logits)
    assert back.recipe == result.recipe
    meta = json.loads((out / COMPACT_META).read_text())
    pruned = [n for n in meta["tensors"] if n.endswith("proj.weight")]
    assert pruned and all(meta["tensors"][n]["stored"] == kind for n in pruned)
    assert meta["aliases"] == {}
    # the payload follows from the encodings: kept values plus 1 bit per element (bitmask) or 2 bits per kept value (2:4)
    expected = 0
    for name, e in meta["tensors"].items():
        numel, t = math.prod(e["shape"]), result.model.state_dict()[name]
        kept = int(nonzero_bits(t).sum())
        expected += {"dense": numel * t.element_size(), "sparse": kept * t.element_size() + math.ceil(numel / 8),
                     "nm": numel // 2 * t.element_size() + math.ceil(numel // 2 * 2 / 8)}[e["stored"]]
    assert _payload_bytes(out) == expected
    info, dense_info = checkpoint_info(out), checkpoint_info(dense_dir)
    assert info["format"] == "compact" and dense_info["format"] == "dense"
    assert info["file_bytes"] < dense_info["file_bytes"]


def test_bf16_stays_bf16(tiny_llama_dir, tmp_path):
    model, tok, _ = load_model(str(tiny_llama_dir), dtype="bfloat16")
    result = prune(model, "magnitude", progress=False)
    out = result.save(tmp_path / "c", format="compact")
    back = prunekit.load(str(out))
    assert back.model.dtype == torch.bfloat16
    same_bits(result.model.state_dict(), back.model.state_dict())
    assert back.model.model.rotary_emb.inv_freq.dtype == torch.float32  # as from_pretrained builds it
    x = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert torch.equal(back.model(x).logits, result.model(x).logits)


def test_structured_only_is_saved_as_the_smaller_dense_model(tmp_path):
    result = _pruned(StructureConfig.create("neurons", 0.25, "l2"))
    out = result.save(tmp_path / "s", format="compact")
    assert (out / "model.safetensors").is_file() and not (out / COMPACT_META).exists()
    plain = AutoModelForCausalLM.from_pretrained(out)  # plain transformers: the widths are uniform
    same_bits(result.model.state_dict(), plain.state_dict())
    assert checkpoint_info(out)["format"] == "dense"


def test_structure_then_sparsity_packs_the_smaller_model(tmp_path):
    model = tiny_model("llama")
    recipe = Recipe((StructureConfig.create("neurons", 0.25, "l2"), PruneConfig.from_method("wanda")))
    result = run(recipe, model, torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0)),
                 progress=False)
    out = result.save(tmp_path / "sw", format="compact")
    assert (out / COMPACT_META).is_file()
    back = prunekit.load(str(out))
    same_bits(result.model.state_dict(), back.model.state_dict())
    assert back.model.model.layers[0].mlp.up_proj.weight.shape[0] == 96


def test_plain_pytorch_model(tmp_path):
    from prunekit.models.rebuild import load_structured

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    with torch.no_grad():
        for lin in (net[0], net[2]):
            lin.weight.masked_fill_(lin.weight.abs() < lin.weight.abs().median(), 0)
    out = prunekit.Result(net).save(tmp_path / "p", format="compact")
    assert (out / COMPACT_META).is_file() and not (out / "model.safetensors").exists()
    fresh = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    same_bits(net.state_dict(), load_structured(out, model=fresh).state_dict())


def test_corrupt_truncated_and_missing_files(tmp_path):
    result = _pruned("magnitude")
    out = result.save(tmp_path / "c", format="compact")
    weights = out / COMPACT_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        prunekit.load(str(out))
    weights.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        prunekit.load(str(out))
    weights.unlink()
    with pytest.raises(ModelLoadError, match=f"no {COMPACT_WEIGHTS}"):
        prunekit.load(str(out))
    out2 = result.save(tmp_path / "c2", format="compact")
    (out2 / COMPACT_META).write_text("{not json")
    with pytest.raises(ModelLoadError, match="is corrupt"):
        prunekit.load(str(out2))


def test_unknown_format_writes_nothing(tmp_path):
    result = _pruned("magnitude")
    with pytest.raises(ConfigError, match="dense, compact"):
        result.save(tmp_path / "x", format="zip")
    assert not (tmp_path / "x").exists()


def test_cli_format_flag(capsys, tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "m")  # 256-token vocabulary: the linears hold most bytes
    args = ["prune", tmp_path / "m", "--method", "magnitude", "--pattern", "2:4", "--json", "--quiet"]
    code, out, _ = run_cli(capsys, *args, "--output", tmp_path / "d")
    assert code == 0
    dense = last_json(out)["checkpoint"]
    code, out, _ = run_cli(capsys, *args, "--output", tmp_path / "c", "--format", "compact")
    assert code == 0
    compact = last_json(out)["checkpoint"]
    assert dense["format"] == "dense" and compact["format"] == "compact" and compact["tensors"]["nm"] == 14
    assert compact["file_bytes"] < dense["file_bytes"]
    import prunekit as pk

    back = pk.load(str(tmp_path / "c")).model
    assert sum(int(p.count_nonzero()) for p in back.parameters()) < sum(p.numel() for p in back.parameters())
    with pytest.raises(SystemExit) as exc:
        run_cli(capsys, *args, "--output", tmp_path / "z", "--format", "zip")
    assert exc.value.code == 2 and not (tmp_path / "z").exists()
    assert "invalid choice: 'zip'" in capsys.readouterr().err


def test_tiny_families_round_trip(tmp_path):
    """Tied heads (gpt2, opt, gemma2 tie them) are stored once and tied again on reload."""
    for family in ("gpt2", "opt", "gemma2"):
        model = tiny_model(family)
        result = prune(model, "magnitude", progress=False)
        out = result.save(tmp_path / family, format="compact")
        back = prunekit.load(str(out))
        same_bits(model.state_dict(), back.model.state_dict())
        aliases = json.loads((out / COMPACT_META).read_text())["aliases"]
        assert list(aliases) == ["lm_head.weight"]
        assert back.model.lm_head.weight is back.model.get_input_embeddings().weight
        x = torch.randint(0, 200, (2, 12))
        with torch.no_grad():
            assert torch.equal(back.model(x).logits, model(x).logits)
