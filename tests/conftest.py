"""Shared fixtures: tiny random models of many families, real text, the real SmolLM2 tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ASSETS = Path(__file__).resolve().parent.parent / "prunekit" / "assets"


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip cleanly on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def default_sigint() -> None:
    """For a child process: Ctrl-C as a terminal delivers it. A shell starts background jobs
    (``cmd &``, nohup) with SIGINT ignored, and children inherit that, so a test that sends
    SIGINT must restore the default first."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def quiet():
    """No warnings or log lines from the models under test (breadth runs hundreds)."""
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def tiny_config(family: str, vocab: int = 256):
    """A tiny random config of a model family; every in-feature is divisible by 8."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=16)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    if family == "gemma":
        return tf.GemmaConfig(**common, head_dim=16)
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=16)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=16,
                                   layer_types=["sliding_attention", "full_attention"])
    if family == "opt":
        return tf.OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                            num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=512)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    if family == "phi":
        return tf.PhiConfig(**common)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "opt", "gpt2", "phi"]


def tiny_model(family: str, vocab: int = 256, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, vocab)).eval()


MOE_FAMILIES = ["mixtral", "qwen2_moe", "olmoe"]


def tiny_moe(kind: str, experts: int = 4, seed: int = 0, vocab: int = 256, hidden: int = 64) -> torch.nn.Module:
    """A tiny random mixture-of-experts decoder with fused 3-D expert tensors (transformers 5):
    2 blocks, top-2, experts of width ``hidden // 2`` (Mixtral's: ``hidden``)."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2)
    if kind == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=hidden, num_local_experts=experts)
    elif kind == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=hidden, moe_intermediate_size=hidden // 2,
                                shared_expert_intermediate_size=hidden // 2, num_experts=experts)
    elif kind == "olmoe":
        cfg = tf.OlmoeConfig(**common, intermediate_size=hidden // 2, num_experts=experts, eos_token_id=1,
                             pad_token_id=0)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="session")
def calib_text() -> str:
    return (ASSETS / "stdlib_docstrings.calib.txt").read_text()


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The real SmolLM2-135M directory (converted from GGUF once, then cached)."""
    from prunekit.models.loading import resolve

    return Path(resolve("default"))


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer, saved as a standard HF directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", vocab=len(smol_tokenizer))
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def ids_for(tokenizer, text: str, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    from prunekit.calibration.text import calibration_windows, tokenize

    return calibration_windows(tokenize(tokenizer, text[:200_000]), n, seqlen, seed)


def run_cli(capsys, *argv):
    """Run the CLI in-process; (exit code, stdout, stderr)."""
    from prunekit.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str):
    import json

    return json.loads(out.strip().splitlines()[-1])


class MaskRouter(TorchFunctionMode):
    """Reference for expert removal: the logits that router weight ``weights[i]`` gives the
    experts ``drop[i]`` are -inf, so no token reaches them."""

    def __init__(self, weights, drop):
        super().__init__()
        self.weights, self.drop = weights, drop

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") == "linear" and len(args) > 1:
            for w, drop in zip(self.weights, self.drop):
                if args[1] is w and drop:
                    out = out.clone()
                    out[..., drop] = float("-inf")
        return out
