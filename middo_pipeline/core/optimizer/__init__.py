"""The optimizer LLM: backends (local transformers, OpenAI-compatible HTTP), a persistent
completion cache, the simplify / extend / rewrite operations and the merge."""
