"""``prompt_style: auto``: pick the optimizer's prompt style by what the model can do.

The stepwise style asks the model to reason and end with a ``### Final prompt`` section; a
small model does not follow it (a 135M model served over HTTP failed 10 calls of 10 with "no
final prompt marker"), while the direct style (a prefilled label, the new prompt only) works
with any instruct model. So:

- a model whose size is known (the local backend, in this process): stepwise from
  ``STEPWISE_MIN_PARAMS`` parameters up, direct below;
- otherwise (a served model): one short probe, a stepwise rewrite of a fixed task; stepwise
  when its answer parses, direct when it does not (or when the call fails). The probe goes
  through the same backend, so it is cached like any call.
"""

from __future__ import annotations

from middo_pipeline.core.llm.protocol import LLMBackend
from middo_pipeline.core.optimizer.parsing import parse_final_prompt
from middo_pipeline.core.optimizer.prompts import PromptConfig, rewrite_request

STEPWISE_MIN_PARAMS = 3_000_000_000
PROBE_TASK = "give three tips for staying healthy"
PROBE_MAX_TOKENS = 768


def _known_params(backend) -> int | None:
    inner = getattr(backend, "backend", backend)  # CachedBackend wraps the real one
    if hasattr(inner, "n_params"):  # the local backend on Ray workers
        return int(inner.n_params)
    if not hasattr(inner, "loaded"):
        return None
    model = getattr(inner.loaded, "model", None)
    if model is None:
        return None
    return sum(p.numel() for p in model.parameters())


def choose_style(backend: LLMBackend) -> tuple[str, str]:
    """``(style, why)`` for ``prompt_style: auto``."""
    params = _known_params(backend)
    if params is not None:
        size = f"{params / 1e6:,.0f}M parameters"
        if params >= STEPWISE_MIN_PARAMS:
            return "stepwise", f"model size: {size}"
        return "direct", f"model size: {size} (< {STEPWISE_MIN_PARAMS / 1e9:g}B)"
    req = rewrite_request(PROBE_TASK, PromptConfig(style="stepwise", max_prompt_tokens=PROBE_MAX_TOKENS))
    out = backend.complete([req])
    c = out[0] if out else None
    if c is None or not c.ok:
        return "direct", f"probe: the stepwise call failed ({(c.error if c else 'no result') or 'no text'})"
    prompt, reason = parse_final_prompt(c.text, "stepwise", [PROBE_TASK])
    if prompt is None:
        return "direct", f"probe: the model does not follow the stepwise format ({reason})"
    return "stepwise", "probe: the model follows the stepwise format"
