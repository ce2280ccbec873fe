"""Delta pruning and merging: the streaming checkpoint files, each method against a hand
computation, the exactness contracts (drop 0 is the identity, merging identical fine-tunes
gives the fine-tune, a compact delta reapplies bit for bit), the errors, and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prunekit.delta import DeltaConfig, MergeConfig, Selection, apply_delta, merge, prune_delta
from prunekit.delta.checkpoint import SafetensorsCheckpoint, TensorSpec, open_checkpoint, save_tensors
from prunekit.delta.compact import pack_mask, unpack_mask
from prunekit.delta.ops import DELTA_METHODS, MERGE_METHODS, DeltaParams, generator_for, magnitude_keep
from prunekit.delta.search import choose_q, q_grid
from prunekit.errors import ConfigError, ModelLoadError, OutputError


def tiny_llama(seed: int, layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def finetune_of(model, seed: int, scale: float = 0.02):
    """A copy of ``model`` with every floating parameter moved a little (a stand-in fine-tune)."""
    import copy

    ft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return ft


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("delta")
    base = tiny_llama(0)
    base.save_pretrained(root / "base")
    finetune_of(base, 1).save_pretrained(root / "ft1")
    finetune_of(base, 2).save_pretrained(root / "ft2")
    tiny_llama(5).save_pretrained(root / "other")  # same architecture, another base
    return root


def sd(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


# ---------------------------------------------------------------- checkpoint files
def test_streamed_files_match_the_safetensors_library(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).reshape(2, 3),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "mask": torch.tensor([True, False])}
    save_tensors(tmp_path / "ours.safetensors", tensors)
    theirs = load_file(str(tmp_path / "ours.safetensors"))  # the reference reader opens ours
    save_file(tensors, str(tmp_path / "lib.safetensors"))
    ckpt = SafetensorsCheckpoint([tmp_path / "lib.safetensors"], "lib")  # ours reads the reference writer's
    for name, t in tensors.items():
        assert theirs[name].dtype == t.dtype and torch.equal(theirs[name], t)
        assert ckpt.spec(name) == TensorSpec(t.dtype, tuple(t.shape)) and torch.equal(ckpt.read(name), t)


def test_truncated_and_corrupt_files_are_named(tmp_path):
    save_tensors(tmp_path / "x.safetensors", {"w": torch.randn(64, 64)})
    raw = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-100])
    with pytest.raises(ModelLoadError, match="truncated"):
        open_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelLoadError, match="corrupt safetensors header"):
        open_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(ModelLoadError, match="does not exist"):
        open_checkpoint(tmp_path / "nowhere")


def test_sharded_checkpoints_keep_their_layout(tmp_path, dirs):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(dirs / "base")
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    AutoModelForCausalLM.from_pretrained(dirs / "ft1").save_pretrained(tmp_path / "ft", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "ft").glob("*.safetensors"))
    assert len(shards) > 2
    prune_delta(tmp_path / "base", tmp_path / "ft", method="magnitude", drop=0.5, output=tmp_path / "out",
                progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == shards
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(open_checkpoint(tmp_path / "ft").names())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    reference = prune_delta(sd(dirs / "base"), sd(dirs / "ft1"), method="magnitude", drop=0.5, progress=False)
    for name, t in loaded.state_dict().items():
        if name in reference.state_dict:
            assert torch.equal(t, reference.state_dict[name]), name


# ---------------------------------------------------------------- methods, by hand
def _delta_pair(shape=(64, 128), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    ft = (base.float() + 0.01 * torch.randn(shape, generator=g)).to(dtype)
    return {"layers.0.w.weight": base}, {"layers.0.w.weight": ft}


@pytest.mark.parametrize("method", DELTA_METHODS.names())
def test_drop_zero_is_the_identity(method):
    base, ft = _delta_pair()
    params = {"q": 1.0} if method == "darex" else {}
    out = prune_delta(base, ft, DeltaConfig(method, 0.0, **params), progress=False).state_dict
    assert torch.equal(out["layers.0.w.weight"], ft["layers.0.w.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dare_drops_at_random_and_rescales_survivors(dtype):
    base, ft = _delta_pair(dtype=dtype)
    b, f = base["layers.0.w.weight"], ft["layers.0.w.weight"]
    out = prune_delta(base, ft, method="dare", drop=0.8, seed=3, progress=False)
    w = out.state_dict["layers.0.w.weight"]
    assert w.dtype == dtype
    keep = torch.rand(b.shape, generator=generator_for(3, "layers.0.w.weight")) >= 0.8  # the same draw, by hand
    expected = torch.where(keep, (b.double() + (f.double() - b.double()) * (1 / (1 - 0.8))).to(dtype), b)
    assert torch.equal(w, expected)
    assert out.report["kept_fraction"] == pytest.approx(keep.float().mean().item())
    assert abs(out.report["kept_fraction"] - 0.2) < 0.02


def test_drop_only_and_darex_scale_by_their_factors():
    base, ft = _delta_pair()
    b, f = base["layers.0.w.weight"].double(), ft["layers.0.w.weight"].double()
    for config, factor in ((DeltaConfig("drop", 0.5), 1.0), (DeltaConfig("darex", 0.5, q=0.8), 1 / 0.8)):
        w = prune_delta(base, ft, config, progress=False).state_dict["layers.0.w.weight"].double()
        kept = w != b
        assert 0.45 < kept.float().mean() < 0.55
        torch.testing.assert_close((w - b)[kept], (f - b)[kept] * factor, rtol=1e-5, atol=5e-7)  # w is float32


@pytest.mark.parametrize("method", ["magnitude", "ties"])
def test_magnitude_keeps_exactly_the_largest_deltas(method):
    base, ft = _delta_pair(shape=(10, 10))
    b, f = base["layers.0.w.weight"], ft["layers.0.w.weight"]
    w = prune_delta(base, ft, method=method, drop=0.73, progress=False).state_dict["layers.0.w.weight"]
    kept = w != b
    assert int(kept.sum()) == 27  # 100 - round(73)
    d = (f - b).abs()
    assert d[kept].min() >= d[~kept].max()
    assert torch.equal(w[kept], f[kept])


def test_tensors_larger_than_a_chunk_are_processed_whole(monkeypatch):
    import prunekit.delta.ops as ops

    base, ft = _delta_pair(shape=(40, 50))
    whole = prune_delta(base, ft, method="dare", drop=0.6, progress=False).state_dict
    merged = merge(base, [ft, ft], method="dare_ties", drop=0.6, progress=False).state_dict
    monkeypatch.setattr(ops, "CHUNK", 7)  # 2000 entries in 286 pieces, the last one short
    assert torch.equal(prune_delta(base, ft, method="dare", drop=0.6, progress=False).state_dict["layers.0.w.weight"],
                       whole["layers.0.w.weight"])
    assert torch.equal(merge(base, [ft, ft], method="dare_ties", drop=0.6, progress=False).state_dict[
        "layers.0.w.weight"], merged["layers.0.w.weight"])


def test_random_masks_do_not_depend_on_order_or_other_tensors():
    base, ft = _delta_pair()
    extra_b = {"layers.1.x.weight": torch.randn(8, 8), **base}
    extra_f = {"layers.1.x.weight": torch.randn(8, 8), **ft}
    one = prune_delta(base, ft, method="dare", drop=0.9, seed=7, progress=False).state_dict
    two = prune_delta(extra_b, extra_f, method="dare", drop=0.9, seed=7, progress=False).state_dict
    other_seed = prune_delta(base, ft, method="dare", drop=0.9, seed=8, progress=False).state_dict
    assert torch.equal(one["layers.0.w.weight"], two["layers.0.w.weight"])
    assert not torch.equal(one["layers.0.w.weight"], other_seed["layers.0.w.weight"])


@pytest.mark.parametrize("method", DELTA_METHODS.names())
@pytest.mark.parametrize("drop", [0.3, 0.9])
def test_every_delta_method_keeps_a_deterministic_mask_and_a_finite_factor(method, drop):
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(32, 50, generator=g)  # (out, in)
    params = DeltaParams(drop, q=1 - drop / 2 if method == "darex" else None)
    keep, scale = DELTA_METHODS.get(method)(delta, params, generator_for(4, "w"))
    again, scale2 = DELTA_METHODS.get(method)(delta, params, generator_for(4, "w"))
    assert keep.dtype == torch.bool and keep.shape == delta.shape and torch.equal(keep, again) and scale == scale2
    assert 1.0 <= scale < float("inf")
    assert abs(keep.float().mean().item() - (1 - drop)) < 0.05  # random ones near, magnitude ones exactly
    if method in ("magnitude", "ties"):
        assert int(keep.sum()) == delta.numel() - round(drop * delta.numel())


@pytest.mark.parametrize("method", MERGE_METHODS.names())
def test_every_merge_method_combines_identical_deltas_into_that_delta(method):
    from prunekit.delta.ops import default_weights

    d = torch.randn(4, 6, dtype=torch.float64)
    w = torch.tensor(default_weights(method, 3), dtype=torch.float64)
    got = MERGE_METHODS.get(method)(torch.stack([d, d, d]), w)  # (k=3, 4, 6) -> (4, 6)
    assert got.shape == d.shape and got.dtype == d.dtype
    torch.testing.assert_close(got, d)


def test_ties_merge_against_an_entry_by_entry_computation():
    deltas = torch.tensor([[0.5, -0.2, 0.0, 0.3, -0.9, 0.1],
                           [-0.4, -0.3, 0.2, 0.3, 0.8, -0.1],
                           [0.1, 0.6, -0.2, 0.0, 0.05, 0.0]], dtype=torch.float64)  # (k=3, 6)
    weights = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    merged = MERGE_METHODS.get("ties")(deltas, weights)
    for j in range(deltas.shape[1]):
        mass = sum(weights[i] * deltas[i, j] for i in range(3))
        sign = 1 if mass > 0 else -1 if mass < 0 else 0
        agree = [i for i in range(3) if deltas[i, j] != 0 and (1 if deltas[i, j] > 0 else -1) == sign]
        want = sum(weights[i] * deltas[i, j] for i in agree) / sum(weights[i] for i in agree) if agree else 0.0
        assert merged[j].item() == pytest.approx(float(want)), j
    # through merge(): each delta trimmed to its top half by magnitude first, then the same
    base = {"layers.0.w.weight": torch.zeros(2, 3, dtype=torch.float64)}
    fts = [{"layers.0.w.weight": d.reshape(2, 3).clone()} for d in deltas]
    got = merge(base, fts, method="ties", drop=0.5, weights=tuple(weights.tolist()), progress=False)
    kept = torch.stack([d * magnitude_keep(d, 0.5) for d in deltas])
    want = MERGE_METHODS.get("ties")(kept, weights).reshape(2, 3)
    assert torch.equal(got.state_dict["layers.0.w.weight"], want)


def test_task_arithmetic_is_the_weighted_sum():
    deltas = torch.randn(3, 4, 5, dtype=torch.float64)
    w = torch.tensor([0.2, 0.3, 1.5], dtype=torch.float64)
    got = MERGE_METHODS.get("task_arithmetic")(deltas, w)
    torch.testing.assert_close(got, 0.2 * deltas[0] + 0.3 * deltas[1] + 1.5 * deltas[2])


@pytest.mark.parametrize("fields", [{"method": "task_arithmetic"}, {"method": "ties", "drop": 0.0},
                                    {"method": "dare_ties", "drop": 0.0}, {"method": "task_arithmetic",
                                                                           "weights": (0.25, 0.25, 0.25, 0.25)}])
def test_merging_identical_finetunes_gives_the_finetune(dirs, fields):
    ft = sd(dirs / "ft1")
    k = len(fields.get("weights", (1, 1)))
    out = merge(sd(dirs / "base"), [ft] * k, progress=False, **fields).state_dict
    assert all(torch.equal(out[n], ft[n]) for n in ft)


def test_choose_q_picks_the_best_of_its_grid():
    base, ft = _delta_pair()
    target = ft["layers.0.w.weight"]
    q, tried = choose_q(base, ft, 0.9, lambda s: float((s["layers.0.w.weight"] - target).square().sum()))
    assert [t["q"] for t in tried] == pytest.approx(q_grid(0.9)) and q_grid(0.9)[0] == pytest.approx(0.1)
    assert q == min(tried, key=lambda t: t["score"])["q"]
    assert len({t["score"] for t in tried}) == len(tried)  # the factor really changes the model


# ---------------------------------------------------------------- which tensors
def test_default_selection_prunes_block_matrices_only(dirs):
    out = prune_delta(dirs / "base", dirs / "ft1", method="dare", drop=0.9, progress=False, output=None)
    per = out.report["per_tensor"]
    pruned = sorted(n for n, s in per.items() if s["pruned"])
    assert pruned and all(n.startswith("model.layers.") and n.endswith("proj.weight") for n in pruned)
    assert not per["model.embed_tokens.weight"]["pruned"] and not per["model.norm.weight"]["pruned"]
    ft = sd(dirs / "ft1")
    assert torch.equal(out.state_dict["model.embed_tokens.weight"], ft["model.embed_tokens.weight"])
    only_mlp = prune_delta(dirs / "base", dirs / "ft1", DeltaConfig(tensors=Selection(include=r"mlp\.", exclude="up")),
                           progress=False)
    chosen = {n for n, s in only_mlp.report["per_tensor"].items() if s["pruned"]}
    assert chosen and all("mlp." in n and "up" not in n for n in chosen)


# ---------------------------------------------------------------- compact deltas
def test_compact_delta_reapplies_bit_for_bit_and_is_small(tmp_path, dirs):
    dense = prune_delta(dirs / "base", dirs / "ft1", method="dare", drop=0.9, output=tmp_path / "dense", progress=False)
    compact = prune_delta(dirs / "base", dirs / "ft1", method="dare", drop=0.9, output=tmp_path / "compact",
                          compact=True, progress=False)
    apply_delta(tmp_path / "compact", dirs / "base", output=tmp_path / "applied", progress=False)
    assert (tmp_path / "dense/model.safetensors").read_bytes() == (tmp_path / "applied/model.safetensors").read_bytes()
    assert (tmp_path / "applied/config.json").is_file()
    # the embedding keeps its whole delta (stored dense), every block matrix one entry in ten
    assert compact.report["bytes_written"] < 0.6 * dense.report["bytes_written"]
    meta = json.loads((tmp_path / "compact/prunekit_delta.json").read_text())
    assert meta["tensors"]["model.layers.0.mlp.up_proj.weight"]["stored"] == "sparse"


def test_compact_delta_refuses_a_wrong_base_and_a_corrupt_file(tmp_path, dirs):
    prune_delta(dirs / "base", dirs / "ft1", method="dare", drop=0.9, output=tmp_path / "c", compact=True,
                progress=False)
    with pytest.raises(ModelLoadError, match="differs from the base this delta was made against"):
        apply_delta(tmp_path / "c", dirs / "other", output=tmp_path / "wrong", progress=False)
    assert not (tmp_path / "wrong").exists() and not list(tmp_path.glob(".wrong*"))
    raw = bytearray((tmp_path / "c/delta.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (tmp_path / "c/delta.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        apply_delta(tmp_path / "c", dirs / "base", output=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_bitmask_packing_round_trips():
    mask = torch.rand(3, 11) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == 5
    assert torch.equal(unpack_mask(packed, (3, 11)), mask)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("make, match", [
    (lambda: DeltaParams(drop=1.0), r"drop 1.0 is outside \[0, 1\)"),
    (lambda: DeltaParams(drop=-0.1), "outside"),
    (lambda: DeltaConfig("darex", 0.9), "darex needs q"),
    (lambda: DeltaConfig("darex", 0.9, q=1.5), r"q 1.5 is outside \(0, 1\]"),
    (lambda: DeltaConfig("dare", 0.9, q=0.5), "q goes with method darex"),
    (lambda: DeltaConfig("daer"), "daer"),
    (lambda: MergeConfig("task_arithmetic", drop=0.5), "task_arithmetic drops nothing"),
    (lambda: Selection(include="(["), "not a valid regular expression"),
])
def test_bad_values_name_the_fix(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_architecture_mismatches_name_the_first_tensor(tmp_path, dirs):
    tiny_llama(0, hidden=48).save_pretrained(tmp_path / "wide")
    with pytest.raises(ModelLoadError, match=r"tensor '(lm_head|model.embed_tokens).weight' has shape \[96, 48\]"):
        prune_delta(dirs / "base", tmp_path / "wide", output=tmp_path / "out", progress=False)
    tiny_llama(0, layers=3).save_pretrained(tmp_path / "deep")
    with pytest.raises(ModelLoadError, match="model.layers.2.* is not in the base"):
        merge(dirs / "base", [dirs / "ft1", tmp_path / "deep"], output=tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="1 weights for 2 fine-tuned models"):
        merge(dirs / "base", [dirs / "ft1", dirs / "ft2"], weights=(1.0,), output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- CLI
def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunekit.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_delta_writes_a_model_from_pretrained_loads(tmp_path, dirs):
    from transformers import AutoModelForCausalLM

    done = cli("delta", str(dirs / "base"), str(dirs / "ft1"), "--method", "dare", "--drop", "0.9",
               "--output", str(tmp_path / "out"), "--seed", "1", "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("per_tensor", "kept_fraction", "bytes_written", "peak_memory_mb", "seconds", "base_sha256"):
        assert key in report
    assert abs(report["kept_fraction"] - 0.1) < 0.03
    assert report["bytes_written"] == sum(f.stat().st_size for f in (tmp_path / "out").iterdir()
                                          if f.name != "prunekit_delta.json")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    api = prune_delta(dirs / "base", dirs / "ft1", method="dare", drop=0.9, seed=1, progress=False).state_dict
    assert all(torch.equal(t, api[n]) for n, t in model.state_dict().items() if n in api)


def test_cli_compact_apply_and_merge(tmp_path, dirs):
    assert cli("delta", str(dirs / "base"), str(dirs / "ft2"), "--method", "ties", "--drop", "0.5", "--compact",
               "--output", str(tmp_path / "c"), "--quiet").returncode == 0
    done = cli("delta", str(dirs / "base"), str(tmp_path / "c"), "--apply", "--output", str(tmp_path / "a"), "--json")
    assert done.returncode == 0, done.stderr
    direct = prune_delta(dirs / "base", dirs / "ft2", method="ties", drop=0.5, progress=False).state_dict
    assert all(torch.equal(t, direct[n]) for n, t in sd(tmp_path / "a").items())
    done = cli("merge", str(dirs / "base"), str(dirs / "ft1"), str(dirs / "ft2"), "--method", "dare_ties",
               "--weights", "0.7", "0.3", "--drop", "0.5", "--output", str(tmp_path / "m"), "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["weights"] == [0.7, 0.3] and report["method"] == "dare_ties"
    api = merge(dirs / "base", [dirs / "ft1", dirs / "ft2"], method="dare_ties", weights=(0.7, 0.3), drop=0.5,
                progress=False).state_dict
    assert all(torch.equal(t, api[n]) for n, t in sd(tmp_path / "m").items())


@pytest.mark.parametrize("args, match", [
    (["--drop", "1.5"], "drop 1.5 is outside"),
    (["--method", "darex"], "darex needs q"),
    (["--method", "nope"], "invalid choice"),
])
def test_cli_bad_arguments_exit_2_and_write_nothing(tmp_path, dirs, args, match):
    done = cli("delta", str(dirs / "base"), str(dirs / "ft1"), *args, "--output", str(tmp_path / "out"))
    assert done.returncode == 2 and match in done.stderr
    assert not (tmp_path / "out").exists()
    done = cli("delta", str(dirs / "base"), str(tmp_path / "c"), "--apply", "--drop", "0.5", "--output", str(tmp_path / "o"))
    assert done.returncode == 2 and "--apply writes what the compact delta records" in done.stderr


def test_cli_output_that_exists_is_refused_before_work(tmp_path, dirs):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        prune_delta(dirs / "base", dirs / "ft1", output=tmp_path / "out", progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_cli_method_choices_follow_the_registries():
    from prunekit import cli as cli_module

    assert sorted(cli_module.DELTA_METHODS) == sorted(DELTA_METHODS.names())
    assert sorted(cli_module.MERGE_METHODS) == sorted(MERGE_METHODS.names())
