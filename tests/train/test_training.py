"""The training step's own additions to the stock Trainer, on a tiny model in-process."""

import pytest
from trainer import training
from trainer.config import TrainConfig


def _trainer(model_dir, tmp_path, **hyperparameters):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = TrainConfig.from_hyperparameters({"max_steps": "1", **hyperparameters})
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if config.method == "lora":
        model = training.apply_lora(model, config)
    args = training.TrainingArguments(output_dir=str(tmp_path), learning_rate=config.learning_rate,
                                      weight_decay=config.weight_decay, use_cpu=True, report_to="none")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return training.AnswerOnlyLossTrainer(model=model, args=args, processing_class=tokenizer,
                                          loraplus_lr_ratio=config.loraplus_lr_ratio)


@pytest.mark.parametrize("ratio", ["16", "1"])
def test_lora_b_matrices_learn_loraplus_ratio_times_faster(tiny_model_dir, tmp_path, ratio):
    trainer = _trainer(tiny_model_dir, tmp_path, learning_rate="0.001", loraplus_lr_ratio=ratio)
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    rates = {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}
    a = {lr for name, lr in rates.items() if "lora_A" in name}
    b = {lr for name, lr in rates.items() if "lora_B" in name}
    assert a == {0.001} and b == {0.001 * float(ratio)}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(rates) == trainable  # every trainable parameter is optimised, nothing frozen is


def test_full_fine_tuning_ignores_the_loraplus_ratio(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, method="full", learning_rate="0.001", loraplus_lr_ratio="16")
    optimizer = trainer.create_optimizer()
    assert {group["lr"] for group in optimizer.param_groups} == {0.001}

