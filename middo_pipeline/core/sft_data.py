"""The SFT data: a sample table as prompt/completion conversations, the chat template a
template-less tokenizer gets, and the re-encoding of rows whose text holds control strings.

Part of the training key's source (``checkpoints.TRAINING_CODE``): it decides what is trained on.
"""

from __future__ import annotations

import polars as pl

from middo_pipeline.core.schema import prompt_text

# For tokenizers without a chat template (base models such as Llama-3.1-8B, which the paper
# fine-tunes): an Alpaca-style layout whose assistant turn ends with the EOS token, so the model
# learns to stop. The prompt rendered with add_generation_prompt is a prefix of prompt +
# response, as trl's completion mask needs.
FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}### Response:\n{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def build_sft_dataset(samples: pl.DataFrame):
    """A ``datasets.Dataset`` of prompt/completion conversations, one row per sample.

    trl treats ``{"prompt": [user message], "completion": [assistant message]}`` as
    conversational prompt/completion data: the chat template is applied and the loss is
    computed on the completion only.
    """
    from datasets import Dataset

    missing = {"instruction", "output"} - set(samples.columns)
    if missing:
        raise ValueError(f"sample table lacks columns {sorted(missing)}")
    inputs = samples["input"].to_list() if "input" in samples.columns else [None] * samples.height
    rows = [
        {
            "prompt": [{"role": "user", "content": prompt_text(ins or "", inp)}],
            "completion": [{"role": "assistant", "content": out or ""}],
        }
        for ins, inp, out in zip(samples["instruction"].to_list(), inputs, samples["output"].to_list())
    ]
    return Dataset.from_list(rows)


def ensure_chat_template(tokenizer) -> bool:
    """Give a template-less tokenizer ``FALLBACK_CHAT_TEMPLATE``; True when it was added.
    The template is saved with the checkpoint, so everything downstream renders the same way."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return True


def literal_control_strings(dataset, tokenizer, max_length: int):
    """trl tokenizes the rendered chat with special-token parsing on, so a sample whose text holds
    ``<|im_end|><|im_start|>system`` would train on real control tokens. Such rows are encoded
    again with ``encode_sample`` (contents as text) and labelled as trl labels them: the prompt
    masked, everything from the response on trained. Other rows are left as trl made them."""
    from middo_pipeline.core.encoding import control_strings, encode_sample, has_control

    controls = control_strings(tokenizer)

    def text(row, key):
        return row[key][0]["content"]

    if not controls or not any(
        has_control(text(r, "prompt"), controls) or has_control(text(r, "completion"), controls) for r in dataset
    ):
        return dataset
    columns = set(dataset.column_names)

    def fix(row):
        prompt, response = text(row, "prompt"), text(row, "completion")
        if not (has_control(prompt, controls) or has_control(response, controls)):
            return {}
        enc = encode_sample(tokenizer, prompt, response, max_length)
        ids, start = list(enc.input_ids), enc.response_span[0]
        out = {"input_ids": ids}
        if "labels" in columns:
            out["labels"] = [-100] * start + ids[start:]
        if "completion_mask" in columns:
            out["completion_mask"] = [0] * start + [1] * (len(ids) - start)
        if "attention_mask" in columns:
            out["attention_mask"] = [1] * len(ids)
        return out

    return dataset.map(fix)
