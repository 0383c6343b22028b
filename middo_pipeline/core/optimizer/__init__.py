"""The optimizer: the simplify / extend / rewrite operations on flagged samples (``operations``),
their prompts (``prompts``) and the parsing of the LLM's answers (``parsing``). The LLM client
itself is ``middo_pipeline.core.llm``; the merge of the refined samples is ``core.merge``."""
