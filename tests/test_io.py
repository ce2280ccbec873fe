"""Save/load round trips, atomic saves, and loading errors, on real safetensors files."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ids_for
from prunekit import PruneConfig, prune
from prunekit.errors import DataError, ModelLoadError, OutputError
from prunekit.export import RECIPE_FILE, REPORT_FILE
from prunekit.models.loading import load_model


def test_round_trip_keeps_zeros_and_recipe(tiny_llama_dir, smol_tokenizer, calib_text, tmp_path):
    model, tok, _ = load_model(str(tiny_llama_dir))
    cfg = PruneConfig.from_method("sparsegpt", pattern="2:4")
    result = prune(model, cfg, ids_for(tok, calib_text, 8, 64), tokenizer=tok, progress=False)
    out = result.save(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    for (n, p), (_, q) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(p, q), n
    assert reloaded.model.layers[0].mlp.down_proj.weight.eq(0).float().mean() == 0.5
    assert PruneConfig.from_yaml(out / RECIPE_FILE) == cfg
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["nm_valid"] and report["sparsity"] == 0.5
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_existing_output_is_refused_then_overwritten(tiny_llama_dir, tmp_path):
    model, tok, _ = load_model(str(tiny_llama_dir))
    result = prune(model, "magnitude", progress=False)
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="--overwrite"):
        result.save(out)
    result.save(out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_failed_save_leaves_nothing(tiny_llama_dir, tmp_path):
    model, _, _ = load_model(str(tiny_llama_dir))
    result = prune(model, "magnitude", progress=False)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    result.tokenizer = BrokenTokenizer()
    with pytest.raises(OSError, match="disk full"):
        result.save(tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


def test_missing_and_corrupt_models(tmp_path, tiny_llama_dir):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="GGUF file .* does not exist"):
        load_model(str(tmp_path / "m.gguf"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((tiny_llama_dir / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model(str(bad))
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model(str(bad))


def test_text_errors(tmp_path, smol_tokenizer):
    from prunekit.api import calibration_data

    cfg = PruneConfig.from_method("wanda")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        calibration_data(smol_tokenizer, str(empty), cfg)
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    with pytest.raises(DataError, match="fewer than one window of --seqlen 512"):
        calibration_data(smol_tokenizer, str(short), cfg)
    with pytest.raises(DataError, match="does not exist"):
        calibration_data(smol_tokenizer, str(tmp_path / "missing.txt"), cfg)


def test_hub_paths_fail_clearly_offline():
    # HF_HUB_OFFLINE=1 (conftest): a hub id is tried, and its failure says what was tried.
    with pytest.raises(ModelLoadError, match="hub id"):
        load_model("prunekit-test/no-such-model")


def test_hub_dataset_without_datasets_package_or_network():
    from prunekit.calibration.text import load_text

    with pytest.raises(DataError, match="wikitext2"):
        load_text("wikitext2", "eval")


def test_a_pruned_encoder_reloads_as_the_class_it_was_saved_from(tmp_path, caplog):
    """A BERT encoder with heads removed (6 heads x 16 != hidden 128: no BertConfig says so)
    reloads with prunekit.load as a BertModel with the same outputs, not as a causal LM with
    a fresh head, and the save says plain from_pretrained cannot."""
    import logging

    import transformers as tf

    import prunekit
    from prunekit.result import Result
    from prunekit.structural import StructureConfig, prune_structure

    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                                       intermediate_size=256)).eval()
    batch = {"input_ids": torch.randint(0, 128, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    result = prune_structure(model, StructureConfig("heads", 0.25, "l2"), example_inputs=batch)
    assert [layer.attention.self.num_attention_heads for layer in model.encoder.layer] == [6, 6]
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    with caplog.at_level(logging.WARNING):
        Result(model, result.recipe, result.report, result.history).save(tmp_path / "enc")
    assert "prunekit.load" in caplog.text
    loaded, _ = prunekit.load(str(tmp_path / "enc"))
    assert type(loaded) is tf.BertModel
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).last_hidden_state, expected)
