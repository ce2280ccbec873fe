"""Training-time pruning with the Hugging Face Trainer: one callback, checkpoints included.

A tiny byte-level Llama is trained on prunekit's bundled Python-docstring text while
gradual pruning takes its blocks' Linear layers to 2:4 sparsity; the sparsity state is saved
in every checkpoint-N folder and restored by resume_from_checkpoint.
Run: python examples/hf_trainer.py
"""
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import prunekit
from prunekit.config import Pattern
from prunekit.schedules import Gradual
from prunekit.training import SparsityCallback

TEXT = Path(prunekit.__file__).parent / "assets" / "stdlib_docstrings.calib.txt"


class Bytes(torch.utils.data.Dataset):
    def __init__(self, n: int, seqlen: int = 64):
        data = torch.tensor(list(TEXT.read_bytes()[: n * seqlen]), dtype=torch.long)
        self.ids = data.view(n, seqlen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(max_steps: int = 40, output_dir: str | None = None) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    out = output_dir or tempfile.mkdtemp()
    schedule = Gradual(target=0.5, start=0, end=max_steps // 2, frequency=5, pattern=Pattern.parse("2:4"))
    callback = SparsityCallback(schedule, ignore=[r"lm_head"])
    args = TrainingArguments(output_dir=out, max_steps=max_steps, per_device_train_batch_size=8,
                             learning_rate=3e-3, save_steps=max_steps // 2, report_to=[], use_cpu=True,
                             logging_steps=max_steps, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Bytes(256), callbacks=[callback]).train()
    report = callback.controller.report()
    return {"sparsity": report["__total__"]["sparsity"], "layers": len(report) - 1, "output_dir": out}


if __name__ == "__main__":
    print(main())
