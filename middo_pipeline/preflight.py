"""Preflight: find misconfiguration before anything is materialized.

``middo loop`` runs :func:`preflight` before the seed step; the first step of each job
(``seed_dataset``, ``round_dataset``) runs :func:`resource_problems` too, so a run launched from
the UI or the schedule fails at its first step, before training, with the same lines. Each
problem is one line that names the setting and what to do:

- the model (``MIDDO_BASE_MODEL``, and ``MIDDO_OPTIMIZER_MODEL`` for the local optimizer) is the
  packaged one, the tiny test model, a folder with ``config.json``, or a Hugging Face id;
- the device (``MIDDO_DEVICE``) exists on this machine;
- the optimizer (``MIDDO_OPTIMIZER_BACKEND``): a known backend; for ``openai`` a base URL is set
  and the server answers and accepts the key (one probe: GET /models or a 1-token completion);
- storage (``MIDDO_HOME``) is writable;
- the run config (``--config``) is valid against each job's config schema.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from middo_pipeline.core.storage import Storage, StorageError


class PreflightError(ValueError):
    """One or more settings are wrong; ``problems`` holds one line per setting."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def check_model(setting: str, name: str) -> str | None:
    """None when ``name`` can be loaded as a model, else the one-line problem."""
    from middo_pipeline.models.loading import DEFAULT_MODEL, TINY_MODEL

    if name in (DEFAULT_MODEL, TINY_MODEL, "", None):
        return None
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            return (
                f"{setting}={name}: not a model folder (no config.json in it); give a folder saved with save_pretrained"
            )
        return None
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name)
    except Exception:  # noqa: BLE001 - HFValidationError: neither a folder nor a hub id
        return (
            f"{setting}={name}: no such model folder, and not a Hugging Face id; set it to a model folder, "
            f"a hub id, or unset it for the packaged {DEFAULT_MODEL}"
        )
    return None


def check_device(device: str) -> str | None:
    device = (device or "auto").strip()
    if device in ("auto", "cpu"):
        return None
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            return f"MIDDO_DEVICE={device}: CUDA is not available on this machine; set MIDDO_DEVICE=cpu or auto"
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            return (
                f"MIDDO_DEVICE={device}: no such GPU ({torch.cuda.device_count()} visible); "
                "use cuda:0 .. cuda:N-1 or auto"
            )
        return None
    if kind == "mps" and not index:
        mps = getattr(torch.backends, "mps", None)
        if not (mps and mps.is_available()):
            return f"MIDDO_DEVICE={device}: MPS is not available on this machine; set MIDDO_DEVICE=cpu or auto"
        return None
    return f"MIDDO_DEVICE={device}: unknown device; use auto, cpu, cuda, cuda:N or mps"


def check_optimizer(optimizer, storage: Storage, probe: bool = True) -> str | None:
    """The optimizer resource: a known backend, its model, and for ``openai`` a server that answers."""
    backend = optimizer.backend
    if backend == "local":
        return check_model("MIDDO_OPTIMIZER_MODEL", optimizer.model)
    if backend != "openai":
        return f"MIDDO_OPTIMIZER_BACKEND={backend}: unknown backend; use local or openai"
    if not optimizer.base_url:
        return (
            "MIDDO_OPTIMIZER_BACKEND=openai needs MIDDO_OPTIMIZER_BASE_URL "
            "(e.g. http://127.0.0.1:8000/v1), or set MIDDO_OPTIMIZER_BACKEND=local"
        )
    if not probe:
        return None
    try:
        client = optimizer.model_copy(update={"use_cache": False}).make_backend(storage)
    except ValueError as exc:
        return f"MIDDO_OPTIMIZER_*: {exc}"
    try:
        client.check()
    except Exception as exc:  # noqa: BLE001 - BackendUnavailable: its message names the fix
        return f"MIDDO_OPTIMIZER_BASE_URL={optimizer.base_url}: {exc}"
    finally:
        close = getattr(client, "close", None)
        if close:
            close()
    return None


def check_storage(storage: Storage) -> str | None:
    try:
        root = storage.ensure_dir(storage.root)
        with tempfile.TemporaryFile(dir=root):
            pass
    except StorageError as exc:
        return f"MIDDO_HOME: {exc}"
    except OSError as exc:
        return f"MIDDO_HOME: cannot write in {storage.root}: {exc.strerror or exc}; set MIDDO_HOME to a writable folder"
    return None


def resource_problems(model=None, optimizer=None, storage: Storage | None = None, probe: bool = True) -> list[str]:
    """What is wrong with the resources given (each may be None: not checked)."""
    problems = []
    if storage is not None:
        problems.append(check_storage(storage))
    if model is not None:
        problems.append(check_model("MIDDO_BASE_MODEL", model.base_model))
        problems.append(check_device(model.device))
    if optimizer is not None:
        if model is None or optimizer.device != model.device:
            problems.append(check_device(optimizer.device))
        problems.append(check_optimizer(optimizer, storage or Storage(), probe=probe))
    return [p for p in problems if p]


def config_problems(job_def, run_config: dict, source: str) -> list[str]:
    """``run_config`` checked against the job's config schema: one line per error."""
    from dagster import DagsterInvalidConfigError, validate_run_config

    try:
        validate_run_config(job_def, run_config)
    except DagsterInvalidConfigError as exc:
        lines = []
        for err in exc.errors:
            message = err.message.split(". Expected:")[0].rstrip(".")
            message = re.sub(r"root:(\S*)", lambda m: m.group(1).replace(":", ".") or "the top level", message)
            lines.append(f"{source}: {message}; fix it (see docs/configuration.md)")
        return lines
    return []


def preflight(defs, run_configs: dict[str, dict], source: str, env: dict | None = None, probe: bool = True) -> None:
    """Raise :class:`PreflightError` listing every problem; ``run_configs`` maps job name -> run config."""
    env = dict(os.environ if env is None else env)
    problems: list[str] = []
    for job_name, cfg in run_configs.items():
        problems += config_problems(defs.resolve_job_def(job_name), cfg, source)
    res = defs.resources
    storage_res = res.get("storage")
    storage = storage_res.get() if storage_res is not None else Storage(env.get("MIDDO_HOME") or None)
    problems += resource_problems(res.get("model"), res.get("optimizer"), storage, probe=probe)
    if problems:
        raise PreflightError(list(dict.fromkeys(problems)))
