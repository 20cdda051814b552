"""Padding-free packing (`packing=true`): several examples per row, position ids restarting per example, attention
that never crosses examples, and the answer-only loss unchanged: a packed batch's loss equals the same examples'
loss unpacked, on a Llama and on a GPT-NeoX (Dolly's architecture)."""

import json
from collections import Counter

import pytest
import torch
from trainer import prompts, training
from trainer.config import TrainConfig
from trainer.data import Example

from .conftest import make_job, run_train, tiny_hyperparameters

QA = [
    ("What is LoRA?", "Low-rank adapters beside the frozen weights."),
    ("Why fine-tune?", "To answer in the data's own words."),
    ("What does SageMaker read?", "The first lines of the failure file."),
    ("Which loss?", "Cross-entropy on the answer tokens only."),
    ("How long?", "Three epochs."),
    ("Where do checkpoints go?", "To the checkpoint directory, synced to S3."),
    ("What is an endpoint?", "A hosted model behind HTTPS."),
]


def _config(**overrides) -> TrainConfig:
    return TrainConfig.from_hyperparameters({"max_steps": "1", "packing": "true", **overrides})


@pytest.fixture(params=["tiny_model_dir", "tiny_dolly_model_dir"], ids=["llama", "gpt_neox"])
def tiny(request):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = request.getfixturevalue(request.param)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    setup = prompts.prepare_tokenizer(tokenizer, prompts.choose_format("auto", tokenizer, str(model_dir)))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if setup.added_tokens:
        model.resize_token_embeddings(len(tokenizer))
    encoded = [prompts.encode_example(tokenizer, Example(q, a, "", f"row {i}")) for i, (q, a) in enumerate(QA)]
    return model.eval(), tokenizer, encoded


def _summed_loss(model, tokenizer, batch, tmp_path) -> torch.Tensor:
    """compute_loss's answer-token sum: divided by 1 item, it is not averaged."""
    config = _config()
    trainer = training.AnswerOnlyLossTrainer(
        model=model,
        args=training.training_arguments(config, tmp_path, train_rows=1),
        processing_class=tokenizer,
        job_config=config,
    )
    with torch.no_grad():
        return trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(1))


def test_packing_is_off_on_the_cpu_unless_asked_for():
    assert not training.use_packing(TrainConfig.from_hyperparameters({}))
    assert training.use_packing(_config())
    assert not training.use_packing(_config(packing="false"))


def test_rows_hold_every_example_whole_and_fit_max_seq_length(tiny):
    _, _, encoded = tiny
    longest = max(len(e["input_ids"]) for e in encoded)
    rows = training.training_rows(encoded, _config(max_seq_length=str(2 * longest)))
    assert len(rows) < len(encoded)
    assert all(len(row["input_ids"]) <= 2 * longest for row in rows)
    assert [len(ids) for ids in rows["input_ids"]] == rows["length"]
    packed = Counter(tuple(row["input_ids"][start : start + n]) for row in rows for start, n in _spans(row))
    assert packed == Counter(tuple(e["input_ids"]) for e in encoded)


def _spans(row):
    start = 0
    for n in row["seq_lengths"]:
        yield start, n
        start += n


def test_the_collator_restarts_positions_per_example_and_pads_as_an_example_of_its_own():
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "seq_lengths": [3, 2]},
        {"input_ids": [1, 2], "labels": [1, 2], "seq_lengths": [2]},
    ]
    batch = prompts.PackedCollator(pad_token_id=0)(rows)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 0, 0, 0]]
    # an example's first token is never a target: the previous example's last token must not learn to predict it
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 2, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]
    # the same bounds end to end, for varlen kernels: 3 + 2 tokens, then 2 and the padding's 3
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5, 7, 10] and batch["max_seq_len"] == 3


def test_a_packed_batch_has_the_loss_of_the_same_examples_unpacked(tiny, tmp_path):
    model, tokenizer, encoded = tiny
    longest = max(len(e["input_ids"]) for e in encoded)
    rows = training.training_rows(encoded, _config(max_seq_length=str(3 * longest)))
    assert max(len(n) for n in rows["seq_lengths"]) >= 2  # some row really holds several examples

    packed = prompts.PackedCollator(tokenizer.pad_token_id)(list(rows))
    unpacked = prompts.CompletionCollator(tokenizer.pad_token_id)(encoded)
    assert packed["attention_mask"].sum() == unpacked["attention_mask"].sum()
    packed_loss = _summed_loss(model, tokenizer, packed, tmp_path)
    unpacked_loss = _summed_loss(model, tokenizer, unpacked, tmp_path)
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=1e-4)


def test_no_example_attends_to_another_in_its_row(tiny):
    """Changing the first example of a row leaves the second's hidden states as they are alone."""
    model, tokenizer, encoded = tiny
    first, second = encoded[0]["input_ids"], encoded[1]["input_ids"]
    row = {"input_ids": first + second, "labels": first + second, "seq_lengths": [len(first), len(second)]}
    changed = {**row, "input_ids": [tokenizer.pad_token_id] * len(first) + second}

    def hidden(batch):
        with torch.no_grad():
            out = model(
                input_ids=batch["input_ids"],
                position_ids=batch["position_ids"],
                use_cache=False,
                output_hidden_states=True,
            )
        return out.hidden_states[-1][0, len(first) :]

    collate = prompts.PackedCollator(tokenizer.pad_token_id)
    alone = model(input_ids=torch.tensor([second]), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(hidden(collate([row])), hidden(collate([changed])))
    torch.testing.assert_close(hidden(collate([row])), alone.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_packed_job_trains_and_counts_its_rows(tmp_path, tiny_model_dir, faq_csv_small):
    hyperparameters = tiny_hyperparameters(
        tiny_model_dir, packing="true", max_seq_length=256, max_steps=3, per_device_batch_size=2, eval_train_samples=2
    )
    job = make_job(tmp_path, hyperparameters, {"train/faq.csv": faq_csv_small})
    result = run_train(job, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "packing: " in result.stdout and " rows of at most 256 tokens" in result.stdout
    manifest = json.loads((job / "model" / "manifest.json").read_text())
    assert manifest["hyperparameters"]["packing"] == "true" and manifest["training"]["steps"] == 3


def test_packed_attention_computes_each_example_alone_and_matches_the_unpacked_loss(tiny, tmp_path, monkeypatch):
    """The varlen path (PyTorch's Flash kernel on a GPU; here its span-by-span reference) through the model's
    attention interface: the same loss as the examples unpacked, and the model attends as before afterwards."""
    from trainer import packed_attention

    model, tokenizer, encoded = tiny
    calls = []

    def reference(*args):
        calls.append(args[3].tolist())
        return packed_attention.reference_varlen_causal(*args)

    monkeypatch.setattr(packed_attention, "varlen_available", lambda query: True)
    monkeypatch.setattr(packed_attention, "varlen_causal", reference)
    longest = max(len(e["input_ids"]) for e in encoded)
    rows = list(training.training_rows(encoded, _config(max_seq_length=str(3 * longest))))
    packed = prompts.PackedCollator(tokenizer.pad_token_id)(rows)
    unpacked = prompts.CompletionCollator(tokenizer.pad_token_id)(encoded)
    expected = _summed_loss(model, tokenizer, unpacked, tmp_path)

    previous = packed_attention.use_packed_attention(model)
    try:
        loss = _summed_loss(model, tokenizer, packed, tmp_path)
    finally:
        model.set_attn_implementation(previous)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    assert calls and calls[0] == packed["cu_seq_lens"].tolist()
    assert calls[0][-1] == packed["input_ids"].numel()  # every token, padding included, in exactly one span
    assert model.config._attn_implementation == previous


def test_a_packed_job_saves_a_model_that_attends_as_before(tmp_path, tiny_model_dir, faq_csv_small):
    hyperparameters = tiny_hyperparameters(
        tiny_model_dir, packing="true", max_seq_length=256, max_steps=2, per_device_batch_size=2, eval_train_samples=2
    )
    job = make_job(tmp_path, hyperparameters, {"train/faq.csv": faq_csv_small})
    result = run_train(job, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    saved = (job / "model" / "config.json").read_text()
    assert "packed_varlen" not in saved
