"""A tiny Llama model and tokenizer built locally in seconds, for tests and smoke runs.

The model is randomly initialised (its text is junk) but it is a real ``LlamaForCausalLM``
with a real chat template, so every code path — training, loss, embeddings, judging,
generation — runs exactly as with a real model, only fast.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from middo_pipeline.atomic import atomic_path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_BASE_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Explain the difference between a list and a tuple in Python.",
    "def add(a, b):\n    return a + b",
    "What is 12 times 7? 12 times 7 is 84.",
    "Paris is the capital of France. Water boils at 100 degrees Celsius at sea level.",
    "Write a short poem about autumn leaves falling in the quiet evening.",
    "Summarize the passage in one sentence. Classify the sentiment as positive or negative.",
    "Score from 0 to 10. Factuality, clarity, completeness. Instruction: Response:",
    "0 1 2 3 4 5 6 7 8 9 10",
]


def build_tiny_model(
    target: str | Path,
    *,
    texts: Iterable[str] = (),
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a tiny model + tokenizer folder to ``target`` (atomically) and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    target = Path(target)
    if (target / "config.json").exists():
        return target

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(_BASE_CORPUS) + [t for t in texts if t]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tok.chat_template = CHAT_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id

    with atomic_path(target, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target
