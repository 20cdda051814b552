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
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = training.training_arguments(config, tmp_path, train_rows=1)
    return training.AnswerOnlyLossTrainer(model=model, args=args, processing_class=tokenizer, job_config=config)


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


def _learning_rates(trainer, steps: int) -> list[float]:
    trainer.create_optimizer()
    schedule = trainer.create_scheduler(steps)
    rates = []
    for _ in range(steps):
        rates.append(schedule.get_last_lr()[0])
        trainer.optimizer.step()
        schedule.step()
    return rates


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        # warm-up over the first 10 steps in every case; then
        ("constant", {10: 1.0, 50: 1.0, 99: 1.0}),
        ("wsd", {10: 1.0, 69: 1.0, 70: 1.0, 85: 0.5, 99: 0.003}),  # stable to step 70, then 30 steps of decay
        ("cosine", {10: 1.0, 55: 0.5, 99: 0.0003}),
    ],
)
def test_learning_rate_schedules_warm_up_then_follow_their_shape(tiny_model_dir, tmp_path, scheduler, expected):
    trainer = _trainer(
        tiny_model_dir,
        tmp_path,
        learning_rate="1.0",
        lr_scheduler=scheduler,
        warmup_ratio="0.1",
        lr_decay_ratio="0.3",
        max_steps="100",
    )
    rates = _learning_rates(trainer, 100)
    assert rates[0] == 0.0 and rates[5] == pytest.approx(0.5)
    for step, rate in expected.items():
        assert rates[step] == pytest.approx(rate, abs=2e-3), (step, rates[step])


def _train_steps(model, optimizer, batch, steps: int = 3) -> None:
    """A few plain optimizer steps: enough to move adapters away from their no-op start."""
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("dora", ["false", "true"])
def test_trained_lora_and_dora_adapters_merge_into_plain_weights_with_the_same_outputs(tiny_model_dir, tmp_path, dora):
    import torch
    from trainer.artifact import merge_for_serving

    trainer = _trainer(tiny_model_dir, tmp_path, learning_rate="0.01", lora_use_dora=dora)
    model = trainer.model
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters()) == (dora == "true")
    optimizer = trainer.create_optimizer()
    batch = torch.randint(0, model.config.vocab_size, (2, 12))
    _train_steps(model, optimizer, batch)
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=batch).logits
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=batch).logits, adapted, atol=1e-3)  # training changed it
        merged = merge_for_serving(model)
        assert not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(input_ids=batch).logits, adapted, rtol=1e-4, atol=1e-4)


# With clipping off, the Trainer still measures the norm for its logs: a "clip" to infinity changes nothing.
@pytest.mark.parametrize(("max_grad_norm", "clipped_to"), [("0.5", [0.5]), ("0", [float("inf")])])
def test_gradients_are_clipped_to_max_grad_norm_and_not_at_all_with_zero(
    tiny_model_dir, tmp_path, max_grad_norm, clipped_to
):
    from datasets import Dataset
    from trainer.prompts import CompletionCollator

    trainer = _trainer(tiny_model_dir, tmp_path, max_grad_norm=max_grad_norm)
    trainer.train_dataset = Dataset.from_list([{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "length": 4}])
    trainer.data_collator = CompletionCollator(pad_token_id=0)
    clip, norms = trainer.accelerator.clip_grad_norm_, []

    def recording_clip(parameters, max_norm, *args, **kwargs):
        norms.append(max_norm)
        return clip(parameters, max_norm, *args, **kwargs)

    trainer.accelerator.clip_grad_norm_ = recording_clip
    trainer.train()
    assert norms == clipped_to


def test_the_adapters_random_start_comes_from_the_seed_hyperparameter(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    def first_a(seed: str):
        torch.rand(7)  # whatever else drew from the global generator before must not matter
        config = TrainConfig.from_hyperparameters({"seed": seed})
        model = training.apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
        return model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().clone()

    assert torch.equal(first_a("7"), first_a("7"))
    assert not torch.equal(first_a("7"), first_a("8"))


def test_trained_token_embeddings_merge_into_the_tied_embeddings_and_touch_only_the_data_tokens(
    tiny_model_dir, tmp_path
):
    import torch
    from trainer.artifact import merge_for_serving
    from transformers import AutoModelForCausalLM

    config = TrainConfig.from_hyperparameters({"lora_train_token_embeddings": "true", "learning_rate": "0.01"})
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert base.config.tie_word_embeddings
    original = base.get_input_embeddings().weight.detach().clone()
    batch = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model = training.apply_lora(base, config, token_ids={5, 6, 7, 8, 9, 10})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    _train_steps(model, optimizer, batch)
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=batch).logits
        merged = merge_for_serving(model)
        torch.testing.assert_close(merged(input_ids=batch).logits, adapted, rtol=1e-4, atol=1e-4)
    embeddings = merged.get_input_embeddings().weight
    assert merged.get_output_embeddings().weight is embeddings  # still tied: the artifact stays one matrix
    changed = (embeddings - original).abs().sum(dim=1) > 0
    assert set(changed.nonzero().flatten().tolist()) == {5, 6, 7, 8, 9, 10}


def test_row_sparse_token_embeddings_match_peft_outputs_and_gradients(tiny_model_dir):
    """Our forward for trained token rows (token_rows.py) against PEFT's own, which rebuilds the whole matrix."""
    import torch
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from transformers import AutoModelForCausalLM

    config = TrainConfig.from_hyperparameters({"lora_train_token_embeddings": "true"})
    model = training.apply_lora(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), config, token_ids={3, 5, 6, 7, 8, 40}
    )
    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]
    assert len(layers) == 2 and all("forward" in vars(m) for m in layers)  # the embedding and the tied head
    with torch.no_grad():  # move the trained rows off their start, so that a wrong row would show
        layers[0].trainable_tokens_delta["default"].add_(torch.randn_like(layers[0].trainable_tokens_delta["default"]))
    batch = torch.tensor([[5, 6, 9, 7, 12, 40, 8], [3, 3, 11, 5, 2, 1, 6]])

    def outputs_and_gradients():
        model.zero_grad()
        logits = model(input_ids=batch).logits
        logits.logsumexp(-1).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ours, our_grads = outputs_and_gradients()
    for layer in layers:
        del layer.forward  # back to PEFT's class method
    theirs, their_grads = outputs_and_gradients()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert our_grads.keys() == their_grads.keys() and any("trainable_tokens" in n for n in our_grads)
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], rtol=1e-4, atol=1e-5, msg=name)
