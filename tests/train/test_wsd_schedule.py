"""The warm-up-stable-decay schedule is sized before the Trainer exists (training_arguments), from the same step
count the Trainer itself arrives at, so its decay starts where a schedule sized from the Trainer's
`num_training_steps` starts it, and the TrainingArguments stay as they were built."""

import pytest
from trainer import training
from trainer.config import TrainConfig

# rows, per-device batch, accumulation, epochs, max_steps, processes
CASES = [
    (40, 4, 1, "3", "-1", 1),
    (41, 4, 2, "2.5", "-1", 1),
    (7, 2, 4, "1", "-1", 1),  # fewer batches than one accumulation: one step per epoch
    (131, 1, 1, "3", "-1", 1),  # the FAQ's training rows with the image's defaults
    (100, 3, 1, "1", "12", 1),  # max_steps wins over epochs
    (41, 4, 2, "3", "-1", 2),
    (3, 4, 8, "2", "-1", 4),  # fewer rows than processes: every process still takes a batch per step
    (131, 2, 3, "1.5", "-1", 8),
]


def _config(batch, accumulation, epochs, max_steps, **extra) -> TrainConfig:
    return TrainConfig.from_hyperparameters(
        {
            "lr_scheduler": "wsd",
            "lr_decay_ratio": "0.3",
            "per_device_batch_size": str(batch),
            "gradient_accumulation_steps": str(accumulation),
            "epochs": epochs,
            "max_steps": max_steps,
            **extra,
        }
    )


def _trainer(model_dir, tmp_path, config: TrainConfig, rows: int):
    from datasets import Dataset
    from trainer.prompts import CompletionCollator
    from transformers import AutoModelForCausalLM

    dataset = Dataset.from_list([{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "length": 4}] * rows)
    args = training.training_arguments(config, tmp_path, train_rows=rows)
    return training.AnswerOnlyLossTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=dataset,
        data_collator=CompletionCollator(pad_token_id=0),
        job_config=config,
    )


def _trainers_step_count(trainer, world_size: int) -> int:
    """The optimizer steps the Trainer computes for its run, from the batches one of `world_size` processes gets
    (accelerate shards a multi-process run's batches as below)."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    if world_size == 1:
        loader = trainer.get_train_dataloader()
    else:
        dataset = trainer.train_dataset
        batches = BatchSampler(SequentialSampler(dataset), trainer.args.per_device_train_batch_size, drop_last=False)
        loader = DataLoader(
            dataset,
            batch_sampler=BatchSamplerShard(
                batches, num_processes=world_size, process_index=world_size - 1, even_batches=True
            ),
        )
    return trainer.set_initial_training_values(trainer.args, loader)[-1]


@pytest.mark.parametrize(("rows", "batch", "accumulation", "epochs", "max_steps", "world_size"), CASES)
def test_the_decay_starts_where_the_trainer_sized_it_from_its_step_count(
    tiny_model_dir, tmp_path, rows, batch, accumulation, epochs, max_steps, world_size
):
    config = _config(batch, accumulation, epochs, max_steps)
    trainer = _trainer(tiny_model_dir, tmp_path, config, rows)
    steps = _trainers_step_count(trainer, world_size)
    assert training.optimizer_steps(config, rows, world_size) == steps

    # Sized from the Trainer's own step count. TrainingArguments for several processes would set up a process
    # group, so for those the function training_arguments calls answers.
    expected = {"num_decay_steps": round(0.3 * steps), "decay_type": "cosine"}
    assert training.lr_scheduler_kwargs(config, rows, world_size) == expected
    if world_size == 1:
        assert trainer.args.lr_scheduler_kwargs == expected


@pytest.mark.parametrize(
    ("rows", "batch", "accumulation", "epochs", "max_steps"), [case[:5] for case in CASES if case[5] == 1]
)
def test_the_learning_rates_are_those_of_the_schedule_sized_inside_the_trainer(
    tiny_model_dir, tmp_path, rows, batch, accumulation, epochs, max_steps
):
    """Step by step, the rates equal those of HF's WSD schedule with its decay sized from the Trainer's own step
    count; and creating the schedule leaves the TrainingArguments as they were."""
    import torch
    from transformers import get_scheduler

    config = _config(batch, accumulation, epochs, max_steps, learning_rate="1.0")
    trainer = _trainer(tiny_model_dir, tmp_path, config, rows)
    steps = _trainers_step_count(trainer, 1)
    settings = trainer.args.to_dict()
    optimizer = trainer.create_optimizer()
    schedule = trainer.create_scheduler(steps)
    assert trainer.args.to_dict() == settings

    reference_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_scheduler(
        "warmup_stable_decay",
        optimizer=reference_optimizer,
        num_warmup_steps=trainer.args.get_warmup_steps(steps),
        num_training_steps=steps,
        scheduler_specific_kwargs={"num_decay_steps": round(0.3 * steps), "decay_type": "cosine"},
    )
    rates, expected = [], []
    for _ in range(steps):
        rates.append(schedule.get_last_lr()[0])
        expected.append(reference.get_last_lr()[0])
        optimizer.step()
        schedule.step()
        reference_optimizer.step()
        reference.step()
    assert rates == expected
    decay_start = steps - round(0.3 * steps)
    if decay_start < steps - 1:  # the rate is at its peak up to the decay and falls after it
        assert rates[decay_start] == 1.0 > rates[decay_start + 1]


def test_other_schedules_take_no_scheduler_arguments(tmp_path):
    for scheduler in ("linear", "cosine", "constant"):
        config = TrainConfig.from_hyperparameters({"lr_scheduler": scheduler})
        assert training.training_arguments(config, tmp_path, train_rows=10).lr_scheduler_kwargs is None


def test_a_training_run_follows_the_schedule_sized_from_its_own_step_count(tiny_model_dir, tmp_path):
    import threading

    import torch
    from trainer.prompts import CompletionCollator
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    config = _config(2, 2, "2", "-1", learning_rate="0.01", warmup_ratio="0.2", logging_steps="1", save_steps="100")
    rows = [{"input_ids": [5, 6, 7, 8 + i], "labels": [-100, -100, 7, 8 + i]} for i in range(9)]
    outcome, trainer = training.train(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(tiny_model_dir),
        training.training_rows(rows, config),
        config,
        training.training_arguments(config, tmp_path, train_rows=len(rows)),
        threading.Event(),
        CompletionCollator(pad_token_id=0),
    )
    steps = trainer.state.max_steps
    assert steps == training.optimizer_steps(config, len(rows)) == 6  # 5 batches, 3 steps an epoch, 2 epochs
    logged = [entry["learning_rate"] for entry in outcome.log_history if "learning_rate" in entry]

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    reference = get_scheduler(
        "warmup_stable_decay",
        optimizer=optimizer,
        num_warmup_steps=trainer.args.get_warmup_steps(steps),
        num_training_steps=steps,
        scheduler_specific_kwargs={"num_decay_steps": round(0.3 * steps), "decay_type": "cosine"},
    )
    expected = []
    for _ in range(steps):
        expected.append(reference.get_last_lr()[0])
        optimizer.step()
        reference.step()
    assert logged == pytest.approx(expected, rel=1e-9, abs=0)
