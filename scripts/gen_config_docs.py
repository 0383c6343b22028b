#!/usr/bin/env python3
"""Write docs/configuration.md from the code: each asset's run config (its Dagster ``Config``
class), each resource's fields, and the ``MIDDO_*`` environment variables.

    python scripts/gen_config_docs.py           # rewrite docs/configuration.md
    python scripts/gen_config_docs.py --check   # exit 1 when it is stale

Field types, defaults and descriptions come from the classes (pydantic ``Field(description=...)``),
so whoever changes a Config class or a resource field runs this script and commits the result;
``middo_pipeline_tests/test_config_docs.py`` fails until they do. The environment variables are
read in several modules, so they are described in ``ENV_VARS`` below; the check fails when the
package's source names a ``MIDDO_*`` variable that ``ENV_VARS`` lacks, or the other way round.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import inspect
import json
import os
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "middo_pipeline"
OUT = REPO / "docs" / "configuration.md"
COMMAND = "python scripts/gen_config_docs.py"

# name: (default, what it sets). Read by the middo_pipeline package (the benchmarks' MIDDO_BENCH_*
# and scripts/setup.sh's variables are documented with them).
ENV_VARS: dict[str, tuple[str, str]] = {
    "MIDDO_PROFILE": (
        "default",
        "`tiny`: a random tiny model for the model and the optimizer (smoke tests; junk text)",
    ),
    "MIDDO_BASE_MODEL": (
        "the packaged SmolLM2-135M-Instruct",
        "The model fine-tuned each round: `resources.model.base_model` (a local folder or a Hugging Face id)",
    ),
    "MIDDO_DEVICE": ("auto", "`auto`, `cpu`, `cuda`, `cuda:N` or `mps`, for the model and the local optimizer"),
    "MIDDO_HOME": (
        "`$DAGSTER_HOME/middo`, else `./.middo`",
        "The storage root: tables, checkpoints, plots and caches",
    ),
    "MIDDO_SEED_PATH": ("the packaged seed file", "The seed file `seed_dataset` reads when its run config names none"),
    "MIDDO_MODEL_CACHE": ("`~/.cache/middo-pipeline/models`", "Where converted models are cached"),
    "MIDDO_OPTIMIZER_BACKEND": (
        "local",
        "`local` (a transformers model in-process) or `openai` (an OpenAI-compatible server)",
    ),
    "MIDDO_OPTIMIZER_MODEL": (
        "the base model's default",
        "local: a model name or folder; openai: the served model's name",
    ),
    "MIDDO_OPTIMIZER_BASE_URL": ("unset", "openai backend: the server, e.g. `http://localhost:8000/v1`"),
    "MIDDO_OPTIMIZER_API_KEY_ENV": ("OPENAI_API_KEY", "The name of the variable that holds the API key (never logged)"),
    "MIDDO_OPTIMIZER_CONCURRENCY": ("8", "openai backend: parallel requests"),
    "MIDDO_OPTIMIZER_QUANTIZE": ("the resource's default", "local backend on CPU: `none` or `int8`"),
    "MIDDO_OPTIMIZER_ENGINE": ("the resource's default", "local backend: `compact` or `generate`"),
    "MIDDO_RAY_ADDRESS": (
        "unset (no Ray)",
        "`local`, `auto`, `ray://HEAD:10001` or `HEAD:6379`: the model passes run on Ray workers (extra `[ray]`)",
    ),
    "MIDDO_RAY_WORKERS": ("0", "Model replicas on the Ray cluster (0: as many as it holds)"),
    "MIDDO_RAY_CPUS_PER_WORKER": ("1", "CPUs reserved by each replica"),
    "MIDDO_RAY_GPUS_PER_WORKER": ("0", "GPUs per replica"),
    "MIDDO_RAY_NUM_CPUS": ("unset", "With `MIDDO_RAY_ADDRESS=local`: the CPUs the local Ray may use"),
    "MIDDO_RAY_FAULT_ONCE_FILE": ("unset", "Tests only: a Ray worker crashes once mid-pass (fault injection)"),
    "MIDDO_NIGHTLY_CRON": ("`0 2 * * *`", "The nightly schedule's cron"),
    "MIDDO_MAX_ROUNDS": ("unset (no limit)", "The nightly schedule starts no round after this one"),
    "MIDDO_STALL_ROUNDS": (
        "3",
        "The nightly schedule stops after this many rounds in a row left the data unchanged (0: never stops)",
    ),
    "MIDDO_LOG_LEVEL": ("INFO", "`middo loop`'s console log level (`DEBUG` prints the trace of a failure)"),
}
# MIDDO_* words in the source that are not environment variables
NOT_VARIABLES = {"MIDDO_PROGRESS": "the prefix of the training subprocess's progress lines"}


def env_vars_in_source() -> set[str]:
    """Every ``MIDDO_*`` name the package's Python source mentions (``MIDDO_OPTIMIZER_*``, a
    family in a message, is not one)."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        names.update(re.findall(r"\bMIDDO_[A-Z0-9_]*[A-Z0-9]\b(?!_)", path.read_text(encoding="utf-8")))
    return names - set(NOT_VARIABLES)


def env_problems() -> list[str]:
    found = env_vars_in_source()
    problems = [f"{n} is read in middo_pipeline/ but not described in ENV_VARS" for n in sorted(found - set(ENV_VARS))]
    problems += [
        f"{n} is described in ENV_VARS but no longer in middo_pipeline/" for n in sorted(set(ENV_VARS) - found)
    ]
    return [f"{p} ({Path(__file__).relative_to(REPO)})" for p in problems]


# -- rendering ---------------------------------------------------------------------------------


def _type(t) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type(a) for a in args)}]" if args else name
    if t is type(None):
        return "None"
    if isinstance(t, type):
        return t.__name__
    return str(t).replace("typing.", "")


def _shown_path(text: str) -> str:
    """Machine-independent: the packaged data folder, the home folder and the checkout by name."""
    from middo_pipeline.packaged import data_dir

    for prefix, name in ((str(data_dir()), "<packaged data>"), (str(REPO), "."), (str(Path.home()), "~")):
        if text.startswith(prefix + os.sep):
            return name + "/" + text[len(prefix) + 1 :]
    return text


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, str):
        return f"`{_shown_path(value)}`" if value else "`''`"
    if isinstance(value, (dict, list, tuple)):
        return f"`{json.dumps(value, default=str)}`"
    return f"`{value!r}`"


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _doc(cls) -> str:
    """The first paragraph of a class's own docstring."""
    doc = cls.__dict__.get("__doc__")
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split()) if doc else ""


def _model(t):
    """The pydantic model class a field holds (``X`` or ``X | None``), else None."""
    from pydantic import BaseModel

    for a in (t, *typing.get_args(t)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _declared_in(cls, name: str) -> str:
    """The module of the class that declares field ``name``."""
    for base in cls.__mro__:
        if name in base.__dict__.get("__annotations__", {}):
            return base.__module__
    return cls.__module__


def _own(cls, name: str) -> bool:
    """Whether field ``name`` is declared by this project's code (not inherited from a library)."""
    return _declared_in(cls, name).startswith("middo_pipeline")


def _rows(cls, prefix: str = "") -> Iterator[str]:
    for name, field in cls.model_fields.items():
        if not _own(cls, name):
            continue
        nested = _model(field.annotation)
        default = "the fields below" if nested is not None else _default(field)
        yield f"| `{prefix}{name}` | {_type(field.annotation)} | {default} | {_cell(field.description)} |"
        if nested is not None:
            yield from _rows(nested, f"{prefix}{name}.")


def _table(cls) -> list[str]:
    rows = list(_rows(cls))
    if not rows:
        return ["No settings."]
    return ["| Field | Type | Default | Description |", "|---|---|---|---|", *rows]


def _inherited(cls) -> list[str]:
    names = [n for n in cls.model_fields if not _own(cls, n)]
    if not names:
        return []
    libs = sorted({_declared_in(cls, n).split(".")[0] for n in names})
    return ["", f"Also the fields it inherits from {', '.join(libs)}: " + ", ".join(f"`{n}`" for n in names) + "."]


def _where(cls) -> str:
    path = Path(inspect.getfile(cls)).resolve()
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return cls.__module__


def _asset_sections(defs) -> list[str]:
    from dagster import AssetsDefinition, Config

    order = {k: i for i, k in enumerate(defs.resolve_asset_graph().toposorted_asset_keys)}
    found = []
    for a in defs.assets or []:
        if not isinstance(a, AssetsDefinition) or a.node_def is None:
            continue
        fn = getattr(getattr(a.op, "compute_fn", None), "decorated_fn", None)
        cls = typing.get_type_hints(fn).get("config") if fn is not None else None
        if not (isinstance(cls, type) and issubclass(cls, Config)):
            continue
        found.append((min(order.get(k, len(order)) for k in a.keys), a, cls))
    out = []
    for _, a, cls in sorted(found, key=lambda x: (x[0], x[1].op.name)):
        op = a.op.name
        keys = sorted(k.to_user_string() for k in a.keys)
        out += [
            f"### `{op}`",
            "",
            f"Materializes {', '.join(f'`{k}`' for k in keys)}. Run config: `ops: {{{op}: {{config: {{...}}}}}}`; "
            f"`{cls.__name__}` in `{_where(cls)}`.",
        ]
        if _doc(cls):
            out += ["", _doc(cls)]
        out += ["", *_table(cls), ""]
    return out


def _resource_sections(defs) -> list[str]:
    out = []
    for key, res in sorted((defs.resources or {}).items()):
        cls = type(res)
        out += [
            f"### `{key}`",
            "",
            f"`{cls.__name__}` in `{_where(cls)}`. Run config: `resources: {{{key}: {{config: {{...}}}}}}`.",
        ]
        if _doc(cls):
            out += ["", _doc(cls)]
        out += ["", *_table(cls), *_inherited(cls), ""]
    return out


def _env_section() -> list[str]:
    out = ["| Variable | Default | What it sets |", "|---|---|---|"]
    out += [f"| `{n}` | {_cell(d)} | {_cell(w)} |" for n, (d, w) in sorted(ENV_VARS.items())]
    return out


def render() -> str:
    # the documented defaults are the code's, not this shell's
    for name in [n for n in os.environ if n.startswith("MIDDO_")]:
        del os.environ[name]
    sys.path.insert(0, str(REPO))
    from middo_pipeline.definitions import defs

    lines = [
        "# Configuration",
        "",
        f"<!-- generated by `{COMMAND}` from the Config classes, the resources and its ENV_VARS table:",
        "     edit those, not this file -->",
        "",
        "Every setting of the pipeline, from the code. Asset settings go in a run config (`middo loop "
        "--config FILE.yaml`, or the UI's launchpad) under `ops:`; resources are set from the `MIDDO_*` "
        "environment variables (below), or under `resources:` in the launchpad. `<packaged data>` is the "
        "folder of the data files installed with the package (`data/` in the repository).",
        "",
        "## Assets",
        "",
        *_asset_sections(defs),
        "## Resources",
        "",
        *_resource_sections(defs),
        "## Environment variables",
        "",
        *_env_section(),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is stale")
    args = ap.parse_args(argv)
    problems = env_problems()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    text = render()
    rel = OUT.relative_to(REPO)
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current == text:
            print(f"{rel} is up to date")
            return 0
        diff = list(difflib.unified_diff(current.splitlines(), text.splitlines(), str(rel), "generated", lineterm=""))
        print("\n".join(diff[:40] + (["..."] if len(diff) > 40 else [])), file=sys.stderr)
        print(f"{rel} is stale: run `{COMMAND}` and commit the result", file=sys.stderr)
        return 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
