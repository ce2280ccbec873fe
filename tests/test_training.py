"""Adapters: Hugging Face Trainer callback (with checkpoint resume), Lightning callback
(optional), and parameter-efficient recovery with masks kept."""
import pytest
import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.masking import prunable_parameters
from prunekit.schedules import Gradual
from prunekit.training import (SparsityController, add_masked_lora, bias_norm_parameters, merge_masked_lora)

from conftest import tiny_model


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n=48, seqlen=16, vocab=256):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seqlen), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def hf_trainer(out, callback, max_steps=12):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=3e-3, weight_decay=0.1, save_steps=6, logging_steps=1000,
                             report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                             save_only_model=False)
    return Trainer(model=tiny_model("llama"), args=args, train_dataset=TokenData(), callbacks=[callback])


def test_hf_trainer_callback_prunes_and_resumes(tmp_path):
    from prunekit.training.hf import STATE_FILE, SparsityCallback

    def schedule():
        return Gradual(target=0.5, start=0, end=10, frequency=5)

    cb = SparsityCallback(schedule(), ignore=[r"lm_head"])
    trainer = hf_trainer(tmp_path, cb)
    trainer.train()
    params = cb.controller.params
    assert len(params) == 14 and "lm_head.weight" not in params  # 2 blocks x 7 Linear layers
    for name, p in params.items():
        assert int((p == 0).sum()) == round(0.5 * p.numel()), name  # exact per-layer sparsity, in the weights
    assert (tmp_path / "checkpoint-6" / STATE_FILE).is_file()
    final = {n: m.clone() for n, m in cb.controller.masks.items()}

    cb2 = SparsityCallback(schedule(), ignore=[r"lm_head"])
    hf_trainer(tmp_path, cb2).train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert cb2.controller.step_count == 12
    assert all(torch.equal(final[n], cb2.controller.masks[n]) for n in final)


def test_lightning_callback(tmp_path):
    lightning = pytest.importorskip("lightning")
    from prunekit.training import lightning_callback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)

    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    cb = lightning_callback(Gradual(target=0.75, start=0, end=8, frequency=4))
    module = Module()
    trainer = lightning.Trainer(max_steps=16, accelerator="cpu", logger=False, enable_progress_bar=False,
                                enable_model_summary=False, callbacks=[cb], default_root_dir=tmp_path,
                                accumulate_grad_batches=2)
    trainer.fit(module, loader)
    assert cb.controller.step_count == 16
    for name, p in prunable_parameters(module).items():
        assert int((p == 0).sum()) == round(0.75 * p.numel()), name
    assert cb.state_dict()["step"] == 16
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)

    cb2 = lightning_callback(Gradual(target=0.75, start=0, end=8, frequency=4))
    trainer2 = lightning.Trainer(max_steps=20, accelerator="cpu", logger=False, enable_progress_bar=False,
                                 enable_model_summary=False, callbacks=[cb2], default_root_dir=tmp_path,
                                 accumulate_grad_batches=2, enable_checkpointing=False)
    trainer2.fit(Module(), loader, ckpt_path=ckpt)  # the controller resumes at step 16
    assert cb2.controller.step_count == 20
    assert all(torch.equal(cb.controller.masks[n], cb2.controller.masks[n]) for n in cb.controller.masks)


def one_shot_pruned_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctrl = SparsityController(model, opt, Gradual(target=0.8, start=0, end=0))
    masks = {n: m.clone() for n, m in ctrl.masks.items()}
    ctrl.make_permanent()
    return model, masks


def regression_batches(n=20):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def fit(model, params, batches):
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_bias_norm_recovery_trains_only_those_and_keeps_masks():
    model, masks = one_shot_pruned_mlp()
    weights_before = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
    params = bias_norm_parameters(model)
    assert len(params) == 4  # two biases + LayerNorm weight and bias
    losses = fit(model, params, regression_batches() * 5)
    assert losses[-1] < losses[0]
    for n, p in prunable_parameters(model).items():
        assert torch.equal(p, weights_before[n]) and (p[masks[n]] == 0).all()
    with pytest.raises(ConfigError, match="nothing would train"):
        bias_norm_parameters(model, biases=False, norms=False)


def test_masked_lora_merges_without_losing_sparsity():
    model, masks = one_shot_pruned_mlp()
    params = add_masked_lora(model, masks, rank=4)
    losses = fit(model, params, regression_batches() * 5)
    assert losses[-1] < losses[0]
    x = torch.randn(8, 16)
    with torch.no_grad():
        before = model(x)
    merged = merge_masked_lora(model)
    with torch.no_grad():
        assert torch.allclose(merged(x), before, atol=1e-5)  # merging changes nothing
    for n, p in prunable_parameters(merged).items():
        assert int((p[masks[n]] != 0).sum()) == 0 and int((p[~masks[n]] != 0).sum()) == int((~masks[n]).sum())
    with pytest.raises(ConfigError, match="nn.Linear"):
        add_masked_lora(nn.Sequential(nn.Conv1d(2, 2, 1)), {"0.weight": torch.zeros(2, 2, 1, dtype=torch.bool)})


def test_peft_lora_merge_keeps_masks():
    pytest.importorskip("peft")
    from prunekit.training import add_peft_lora, merge_peft_lora

    model, masks = one_shot_pruned_mlp()
    peft_model = add_peft_lora(model, ["0", "3"], rank=4)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    fit(peft_model, trainable, regression_batches())
    merged = merge_peft_lora(peft_model, masks)
    for n, p in prunable_parameters(merged).items():
        assert int((p[masks[n]] != 0).sum()) == 0
