"""Prompt formats and tokenization for supervised fine-tuning.

The format used in training is written into the artifact's tokenizer as its chat template, so the serving
side only calls `apply_chat_template(..., add_generation_prompt=True)` and needs no code from here.

- `chat_template`: the base model's own chat template (SmolLM2, Llama, Qwen, ...).
- `dolly`: the instruction format databricks/dolly-v2 was trained with (`### Instruction:` / `### Response:` /
  `### End`), installed as a chat template for models that have none.

With retrieval, the artifact's chat template starts with DOCUMENTS_PREAMBLE: given `documents` (a list of
`{"title", "text"}`), it appends them to the last user message after `Input:`, as the context column is; without
`documents` the template renders exactly as it did without the preamble.

Loss is on the answer only: prompt and padding tokens get label IGNORE_INDEX, and `answer_token_loss` is the one
loss on such labels, for training and evaluation alike. Every example ends with the EOS token, and pad is made
distinct from EOS, so the model learns to stop (a classic failure when pad == eos masks every EOS).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from .data import Example

IGNORE_INDEX = -100  # the label of a position without loss (PyTorch's cross-entropy default)
DOLLY_INTRO = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
DOLLY_END = "### End"
# Rendered exactly like Dolly's PROMPT_NO_INPUT_FORMAT; context, when present, goes in the user message.
DOLLY_CHAT_TEMPLATE = (
    "{{ '" + DOLLY_INTRO + "\\n\\n' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\\n' + message['content'] + '\\n\\n" + DOLLY_END + "' + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
# Put before a chat template when retrieval is on. Given `documents` ([{"title", "text"}, ...], non-empty), it
# rebinds `messages` so that the last user message reads `content + "\n\nInput:\n[1] title\ntext\n\n[2] ..."`
# (the `Input:` of the context column), and hides `documents` from the template after it (a base template with
# documents of its own would list them twice). It writes nothing itself: whitespace control strips the text between
# its tags, and the newline it ends with is the one Transformers' trim_blocks removes after a block tag, so the
# template after it starts on a line of its own and renders byte for byte as without it.
DOCUMENTS_PREAMBLE = (
    "{%- if documents is defined and documents -%}"
    "{%- set ns = namespace(msgs=[], last=-1, block='') -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for d in documents -%}"
    "{%- set ns.block = ns.block + ('' if loop.first else '\\n\\n') + '[' + loop.index|string + '] ' + d['title']"
    " + '\\n' + d['text'] -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if loop.index0 == ns.last -%}"
    "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': m['content'] + '\\n\\nInput:\\n' + ns.block}] -%}"
    "{%- else -%}{%- set ns.msgs = ns.msgs + [m] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.msgs -%}"
    "{%- set documents = none -%}"
    "{%- endif %}\n"
)
# A pad token the vocabulary already has, tried in order before one is added (which resizes the embeddings):
# GPT-NeoX tokenizers (dolly-v2) carry `<|padding|>`.
FALLBACK_PAD_TOKENS = ("<|padding|>", "<|endoftext|>", "<|pad|>", "<pad>", "[PAD]")


@dataclass(frozen=True)
class PromptSetup:
    format: str
    stop_token_ids: tuple[int, ...]
    added_tokens: int  # > 0 means the model's embeddings must be resized
    # End markers that are several tokens in this vocabulary, so no stop token can stand for them.
    stop_strings: tuple[str, ...] = ()
    documents: bool = False  # the chat template takes `documents` (DOCUMENTS_PREAMBLE)


def choose_format(requested: str, tokenizer, model_id: str) -> str:
    if requested != "auto":
        return requested
    if "dolly" in model_id.lower() or not getattr(tokenizer, "chat_template", None):
        return "dolly"
    return "chat_template"


def prepare_tokenizer(tokenizer, prompt_format: str, *, documents: bool = False) -> PromptSetup:
    """Install the prompt format and a pad token distinct from EOS, in place; with `documents` (retrieval), the
    chat template also takes retrieved passages (DOCUMENTS_PREAMBLE)."""
    added = 0
    if tokenizer.eos_token is None:
        added += tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    if prompt_format == "dolly":
        tokenizer.chat_template = DOLLY_CHAT_TEMPLATE
    elif not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_format 'chat_template' needs a tokenizer with a chat template")
    if documents:
        tokenizer.chat_template = with_documents(tokenizer.chat_template)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        candidate = next((t for t in FALLBACK_PAD_TOKENS if t in vocab and vocab[t] != tokenizer.eos_token_id), None)
        if candidate is not None:
            tokenizer.pad_token = candidate
        else:
            added += tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    tokenizer.padding_side = "left"  # generation-friendly default for the artifact; training pads itself
    stops, stop_strings = [tokenizer.eos_token_id], ()
    if prompt_format == "dolly":
        end_ids = tokenizer.encode(DOLLY_END, add_special_tokens=False)
        if len(end_ids) == 1:  # dolly-v2 tokenizers carry "### End" as one special token
            stops.insert(0, end_ids[0])
        else:  # elsewhere it is text: the artifact carries it as a stop string (generation_config.json)
            stop_strings = (DOLLY_END,)
    return PromptSetup(prompt_format, tuple(stops), added, stop_strings, documents)


def with_documents(chat_template: str) -> str:
    """The chat template with DOCUMENTS_PREAMBLE before it (once: a base model tuned with retrieval has it)."""
    if not isinstance(chat_template, str):
        raise ValueError("retrieval needs the tokenizer's chat template as one template (it has several, by name)")
    return chat_template if chat_template.startswith(DOCUMENTS_PREAMBLE) else DOCUMENTS_PREAMBLE + chat_template


def user_message(example: Example) -> dict[str, str]:
    """The question, with its context after it as Dolly's instruction-with-input format has it (`Input:`)."""
    content = example.question if not example.context else f"{example.question}\n\nInput:\n{example.context}"
    return {"role": "user", "content": content}


def conversation(example: Example) -> list[dict[str, str]]:
    """The example as chat messages: its own turns for a conversation, else the question and the answer."""
    if example.messages:
        return [{"role": role, "content": content} for role, content in example.messages]
    return [user_message(example), {"role": "assistant", "content": example.answer}]


Documents = Sequence[dict[str, str]]  # [{"title": ..., "text": ...}, ...], as the chat template takes them


def _render(tokenizer, messages: list[dict[str, str]], documents: Documents | None, **kwargs) -> str:
    """The chat template rendered as text; `documents` are passed only when there are some, so that a prompt
    without them is rendered exactly as before retrieval existed."""
    extra = {"documents": [dict(d) for d in documents]} if documents else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, **extra, **kwargs)


def prompt_text(tokenizer, question: str, context: str = "", documents: Documents | None = None) -> str:
    """The text a model sees before answering: what serving renders from the artifact's chat template, with the
    retrieved `documents` when given."""
    return _render(tokenizer, [user_message(Example(question, "", context))], documents, add_generation_prompt=True)


def example_prompt(tokenizer, example: Example, documents: Documents | None = None) -> str:
    """What a model sees before the example's last answer: the question, or the conversation up to its last turn;
    with `documents` in its last user message when given."""
    return _render(tokenizer, conversation(example)[:-1], documents, add_generation_prompt=True)


def encode_example(tokenizer, example: Example, documents: Documents | None = None) -> dict[str, list[int]]:
    """Token ids and labels, with labels on the assistant turns only (every one of a conversation's), each
    ending on EOS. The text between assistant turns is tokenized apart from them, so each prompt matches what a
    server renders for that point of the conversation. `documents` (retrieval) go into the last user message, the
    one before the last answer, as serving puts them in the last user message of a request; the turns before are
    rendered without them, as the earlier requests of that conversation were."""
    messages = conversation(example)
    last_answer = len(messages) - 1
    eos = tokenizer.eos_token
    input_ids: list[int] = []
    labels: list[int] = []
    consumed = ""  # the rendered conversation encoded so far
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        turn_documents = documents if turn == last_answer else None
        prompt = _render(tokenizer, messages[:turn], turn_documents, add_generation_prompt=True)
        full = _render(tokenizer, messages[: turn + 1], turn_documents)
        if not full.startswith(prompt) or not prompt.startswith(consumed):
            raise ValueError("the chat template renders the prompt differently with and without the answer")
        completion = full[len(prompt) :]
        end = completion.rfind(eos)
        completion = completion[: end + len(eos)] if end >= 0 else completion  # end on EOS, nothing after
        prompt_ids = tokenizer(prompt[len(consumed) :], add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion if end >= 0 else completion + eos, add_special_tokens=False)["input_ids"]
        input_ids += prompt_ids + completion_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + completion_ids
        consumed = prompt + completion
    return {"input_ids": input_ids, "labels": labels}


class CompletionCollator:
    """Pads a batch to its longest sequence (right padding; labels padded with IGNORE_INDEX)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        input_ids, labels, mask = [], [], []
        for f in features:
            pad = longest - len(f["input_ids"])
            input_ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            mask.append([1] * len(f["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }


class PackedCollator:
    """Batches packed rows (`training_rows` with packing): each row holds several examples, listed by length in
    `seq_lengths`. Rows are right-padded to the batch's longest; position ids restart at 0 for every example and
    for the padding, which the model reads as example bounds (see AnswerOnlyLossTrainer.compute_loss).
    `attention_mask` marks real tokens for the Trainer's token count; the model is not given it. `cu_seq_lens`
    and `max_seq_len` give the same bounds as cumulative lengths over the rows laid end to end, for attention
    kernels that take them (trainer.packed_attention)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        input_ids, labels, positions, mask = [], [], [], []
        bounds = [0]
        for f in features:
            pad = longest - len(f["input_ids"])
            row_labels = list(f["labels"])
            row_positions, start = [], 0
            for length in [*f["seq_lengths"], *([pad] if pad else [])]:
                bounds.append(bounds[-1] + length)
            for length in f["seq_lengths"]:
                row_positions += range(length)
                # The last token of one example must not learn to predict the first of the next. Prompts carry
                # no labels, so this holds already; kept explicit so that it holds for any data.
                row_labels[start] = IGNORE_INDEX
                start += length
            input_ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(row_labels + [IGNORE_INDEX] * pad)
            positions.append(row_positions + list(range(pad)))
            mask.append([1] * len(f["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "cu_seq_lens": torch.tensor(bounds, dtype=torch.int32),
            "max_seq_len": max(b - a for a, b in itertools.pairwise(bounds)),
        }


def answer_token_loss(hidden, labels, lm_head):
    """Cross-entropy on the answer tokens of a batch, summed, and the number of those tokens (both tensors).

    `hidden` is the decoder's last hidden state (batch x length x width), `labels` the batch's labels with
    IGNORE_INDEX where no loss is taken. Position t predicts token t + 1 (the causal LM shift). `lm_head` (the
    model's output embeddings) runs on answer positions only, so the other positions' logits, a vocabulary-sized
    row each, are never computed; the loss is taken in fp32. Callers divide the sum by the tokens they average
    over: one batch, the batches of an accumulated step, or a whole evaluation set.
    """
    import torch

    targets = labels[:, 1:]
    answer_positions = targets != IGNORE_INDEX
    logits = lm_head(hidden[:, :-1][answer_positions]).float()
    loss = torch.nn.functional.cross_entropy(logits, targets[answer_positions], reduction="sum")
    return loss, answer_positions.sum()
