"""Training-time pruning with the Hugging Face Trainer: one callback, checkpoints included.

A tiny byte-level Llama is trained on prunekit's bundled Python-docstring text while
gradual pruning takes its blocks' Linear layers to 2:4 sparsity; the sparsity state is saved
in every checkpoint-N folder and restored by resume_from_checkpoint. Pruning starts at
initialisation, so the dense baseline is the same model trained with the same budget (same
initialisation, data order and steps) without the callback; both are measured by perplexity
on the bundled evaluation text (disjoint from the training text).
Checkpoints go to a temporary folder that is deleted at the end, unless --output DIR keeps them.
Run: python examples/hf_trainer.py [--output DIR]
"""
import argparse
import math
import os
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import prunekit
from prunekit.config import Pattern
from prunekit.schedules import Gradual
from prunekit.training import SparsityCallback

ASSETS = Path(prunekit.__file__).parent / "assets"
TEXT = ASSETS / "stdlib_docstrings.calib.txt"
EVAL_TEXT = ASSETS / "stdlib_docstrings.eval.txt"


class Bytes(torch.utils.data.Dataset):
    def __init__(self, n: int, seqlen: int = 64, path: Path = TEXT):
        data = torch.tensor(list(path.read_bytes()[: n * seqlen]), dtype=torch.long)
        self.ids = data.view(n, seqlen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def new_model() -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same initialisation for the dense and the pruned model
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def train(model, output_dir: str, max_steps: int, callbacks=(), save: bool = True) -> None:
    args = TrainingArguments(output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=8,
                             learning_rate=3e-3, save_steps=max(1, max_steps // 2), report_to=[], use_cpu=True,
                             logging_steps=max_steps, disable_tqdm=True, save_strategy="steps" if save else "no")
    Trainer(model=model, args=args, train_dataset=Bytes(256), callbacks=list(callbacks)).train()


@torch.no_grad()
def perplexity(model, data: Bytes) -> float:
    model.eval()
    losses = [model(input_ids=data.ids[i : i + 8], labels=data.ids[i : i + 8]).loss for i in range(0, len(data), 8)]
    return math.exp(torch.stack(losses).mean().item())


def main(max_steps: int = 40, output_dir: str | None = None) -> dict:
    """Train dense and pruned; checkpoints of the pruned run are kept in ``output_dir`` when
    given, else written to a temporary folder that is removed before returning."""
    held_out = Bytes(32, path=EVAL_TEXT)  # 2,048 bytes of the evaluation text
    with tempfile.TemporaryDirectory(prefix="prunekit-hf-example-") as tmp:
        dense = new_model()
        train(dense, os.path.join(tmp, "dense"), max_steps, save=False)
        dense_ppl = perplexity(dense, held_out)

        model = new_model()
        schedule = Gradual(target=0.5, start=0, end=max_steps // 2, frequency=5, pattern=Pattern.parse("2:4"))
        callback = SparsityCallback(schedule, ignore=[r"lm_head"])
        train(model, output_dir or os.path.join(tmp, "pruned"), max_steps, [callback])
        ppl = perplexity(model, held_out)
    report = callback.controller.report()
    sparsity = report["__total__"]["sparsity"]
    print(f"dense perplexity {dense_ppl:.2f} -> pruned (2:4, {sparsity:.0%} sparse) {ppl:.2f}  (byte-level, "
          f"{held_out.ids.numel()} held-out bytes; dense: same init, data and {max_steps} steps without pruning)")
    return {"sparsity": sparsity, "layers": len(report) - 1, "perplexity": ppl, "dense perplexity": dense_ppl,
            "output_dir": output_dir}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="keep the pruned run's checkpoint-N folders here (default: deleted)")
    parser.add_argument("--max-steps", type=int, default=40)
    cli = parser.parse_args()
    main(cli.max_steps, cli.output)
