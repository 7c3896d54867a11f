"""KFACPreconditioner inside Hugging Face's Trainer (issue 11, item 7): the README's recipe trains a GPT-2 from a
tiny config with gradient accumulation, and the preconditioner sees every micro-batch of every step."""

from __future__ import annotations

import pytest
import torch

import kronograph

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from kronograph.runtime.huggingface import KFACTrainerCallback  # noqa: E402


class Repeats(torch.utils.data.Dataset):
    """Sequences 0, 1, ..., 15 shifted by a random offset modulo 20: the next token is always the last + 1."""

    def __init__(self, size: int = 64) -> None:
        generator = torch.Generator().manual_seed(0)
        self.offsets = torch.randint(0, 20, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = (torch.arange(16) + self.offsets[i]) % 20
        return {"input_ids": ids, "labels": ids}


def test_the_readme_trainer_recipe_trains_with_accumulation(tmp_path):
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=20, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, use_cache=False)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    data = Repeats()
    precond = kronograph.optim.KFACPreconditioner(kronograph.compile(model, (data[0]["input_ids"][None],)))
    callback = KFACTrainerCallback(precond)
    steps = []

    class Record(transformers.TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            steps.append(dict(callback.last_info))

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=12,
        learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, Record()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 12 and all(info["preconditioned"] == len(precond.blocks) for info in steps)
    assert steps[0]["statistics_updated"] and precond.stats_updates == 12
    # kl_clip's bound at the Trainer's AdamW rates (3e-3, decaying), not SGD's assumed 0.1
    assert isinstance(precond.lr, torch.optim.Optimizer) and all(0 < info["kl_scale"] <= 1 for info in steps)
    assert losses[-1] < 0.85 * losses[0], losses
