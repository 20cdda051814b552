"""One answer-token loss (prompts.answer_token_loss) for training and evaluation, checked against a reference
written out in full here: the same values, bit for bit, and the same losses logged in training."""

import threading

import pytest
import torch
from trainer import prompts, training
from trainer.config import TrainConfig
from trainer.data import Example

QA = [
    ("What is LoRA?", "Low-rank adapters beside the frozen weights."),
    ("Why fine-tune?", "To answer in the data's own words."),
    ("What does SageMaker read?", "The first lines of the failure file."),
    ("Which loss?", "Cross-entropy on the answer tokens only."),
    ("How long?", "Three epochs."),
    ("Where do checkpoints go?", "To the checkpoint directory, synced to S3."),
]


def reference_sum_and_count(hidden, labels, lm_head):
    """The summed loss on the answer tokens and their count, spelled out."""
    targets = labels[:, 1:]
    answer_positions = targets != -100
    logits = lm_head(hidden[:, :-1][answer_positions]).float()
    loss = torch.nn.functional.cross_entropy(logits, targets[answer_positions], reduction="sum")
    return loss, answer_positions.sum()


def reference_compute_loss(trainer, model, inputs, num_items_in_batch=None):
    """AnswerOnlyLossTrainer.compute_loss with the loss spelled out."""
    inner = training._unwrap(model)
    captured = {}

    def keep_hidden(_module, _args, output):
        captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = inner.get_decoder().register_forward_hook(keep_hidden)
    try:
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=1)
    finally:
        handle.remove()
    loss, answer_tokens = reference_sum_and_count(captured["hidden"], inputs["labels"], inner.get_output_embeddings())
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
        if trainer.args.average_tokens_across_devices:
            loss = loss * trainer.accelerator.num_processes
    else:
        loss = loss / answer_tokens.clamp(min=1)
    return loss


class ReferenceLossTrainer(training.AnswerOnlyLossTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = reference_compute_loss(self, model, inputs, num_items_in_batch)
        return (loss, None) if return_outputs else loss


def test_ignore_index_is_the_one_the_labels_and_pytorch_use():
    assert prompts.IGNORE_INDEX == -100 == torch.nn.CrossEntropyLoss().ignore_index


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_answer_token_loss_equals_the_reference_and_the_full_logits_cross_entropy(dtype):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 9, 16, generator=generator).to(dtype)
    lm_head = torch.nn.Linear(16, 50, bias=False).to(dtype)
    labels = torch.randint(0, 50, (3, 9), generator=generator)
    labels[0, :4] = prompts.IGNORE_INDEX  # prompt
    labels[1, :2] = prompts.IGNORE_INDEX
    labels[1, 6:] = prompts.IGNORE_INDEX  # padding
    labels[2, :] = prompts.IGNORE_INDEX  # nothing to learn from

    loss, tokens = prompts.answer_token_loss(hidden, labels, lm_head)
    reference_loss, reference_tokens = reference_sum_and_count(hidden, labels, lm_head)
    assert torch.equal(loss, reference_loss) and torch.equal(tokens, reference_tokens)
    assert tokens.item() == 5 + 4 and loss.dtype == torch.float32

    full = lm_head(hidden).float()[:, :-1].reshape(-1, 50)
    expected = torch.nn.functional.cross_entropy(
        full, labels[:, 1:].reshape(-1), reduction="sum", ignore_index=prompts.IGNORE_INDEX
    )
    torch.testing.assert_close(loss, expected)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny chat model's tokenizer prepared as a job prepares it, and the encoded examples."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts.prepare_tokenizer(tokenizer, prompts.choose_format("auto", tokenizer, str(tiny_model_dir)))
    encoded = [prompts.encode_example(tokenizer, Example(q, a, "", f"row {i}")) for i, (q, a) in enumerate(QA)]
    return tiny_model_dir, tokenizer, encoded


def _model(model_dir, tokenizer, config: TrainConfig):
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    if config.method == "lora":
        model = training.apply_lora(model, config, token_ids={t for e in QA for t in tokenizer(e[1])["input_ids"]})
    return model


@pytest.mark.parametrize("method", ["lora", "full"])
def test_compute_loss_equals_the_reference(tiny, tmp_path, method):
    model_dir, tokenizer, encoded = tiny
    config = TrainConfig.from_hyperparameters({"method": method, "max_steps": "1"})
    model = _model(model_dir, tokenizer, config).eval()
    trainer = training.AnswerOnlyLossTrainer(
        model=model,
        args=training.training_arguments(config, tmp_path, train_rows=len(encoded)),
        processing_class=tokenizer,
        job_config=config,
    )
    batch = prompts.CompletionCollator(tokenizer.pad_token_id)(encoded[:4])
    with torch.no_grad():
        for num_items in (None, torch.tensor(57)):
            new = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
            old = reference_compute_loss(trainer, model, batch, num_items)
            assert torch.equal(new, old), (num_items, new, old)


def test_training_logs_the_same_losses_as_with_the_reference_loss(tiny, tmp_path, monkeypatch):
    """A few accumulated steps of real training: the logged losses (and so the weights) do not change."""
    model_dir, tokenizer, encoded = tiny
    config = TrainConfig.from_hyperparameters(
        {
            "max_steps": "3",
            "per_device_batch_size": "2",
            "gradient_accumulation_steps": "2",
            "logging_steps": "1",
            "save_steps": "100",
            "learning_rate": "0.01",
        }
    )
    collator = prompts.CompletionCollator(tokenizer.pad_token_id)

    def logged_losses(name):
        outcome, _ = training.train(
            _model(model_dir, tokenizer, config),
            tokenizer,
            training.training_rows(encoded, config),
            config,
            training.training_arguments(config, tmp_path / name, train_rows=len(encoded)),
            threading.Event(),
            collator,
        )
        return [entry["loss"] for entry in outcome.log_history if "loss" in entry]

    losses = logged_losses("shared")
    monkeypatch.setattr(training, "AnswerOnlyLossTrainer", ReferenceLossTrainer)
    reference = logged_losses("reference")
    assert len(losses) == 3 and losses == reference


def test_evaluation_answer_loss_equals_the_reference(tiny):
    from trainer.evaluation import answer_loss

    model_dir, tokenizer, encoded = tiny
    model = _model(model_dir, tokenizer, TrainConfig.from_hyperparameters({"method": "full"}))
    collator = prompts.CompletionCollator(tokenizer.pad_token_id)
    total, tokens = 0.0, 0
    model.eval()
    for start in range(0, len(encoded), 4):
        batch = collator(encoded[start : start + 4])
        with torch.inference_mode():
            hidden = model.get_decoder()(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
            loss, count = reference_sum_and_count(hidden, batch["labels"], model.get_output_embeddings())
        total += loss.item()
        tokens += int(count)
    assert answer_loss(model, encoded, collator, batch_size=4) == total / tokens
