"""closed_loop: does the loop make data better when the optimizer is competent?

1. **A corrupted seed** beside its clean counterpart (``build_corrupted``): clean seed rows,
   about a third defective rows of every kind of the controlled set (``controlled.py``: the
   four quality kinds, the four hard kinds) and isolated rows. Every defective row has a known
   good version: the clean seed row it was made from (garbled, truncated, unrelated, hard), or
   the right answer (wrong facts; questions that the held-out sets ask are left out, so a repair
   is never a copy of the test). Isolated rows have a written extension.
2. **The real loop** (``middo loop --rounds R`` in a subprocess, a fresh Dagster instance) on the
   corrupted seed, its optimizer the stand-in of ``standin.py`` served over the OpenAI API, at
   several ``p`` (the chance of a good answer), and once with the bundled 135M optimizer.
3. **What happened, per round** (``round_report``): defects flagged by kind and clean rows
   flagged, repairs (a known good version accepted), junk accepted (a failure accepted),
   neutral answers accepted, rows changed, the prompt style and acceptance bar chosen and why,
   rollbacks.
4. **Downstream** (``downstream``): LoRA fine-tunes of the base model (one epoch, several
   training seeds) on the clean data, the corrupted seed and the loop's data after each round;
   paired per held-out item (multiple-choice accuracy and response loss of the 240-item set),
   and the recovery ratio (round k − corrupted) / (clean − corrupted) with a bootstrap interval
   over items and runs.

``python -m benchmarks.closed_loop --smoke`` runs the whole path on the tiny model in minutes
(its numbers mean nothing); without it, the default model (hours on 2 cores; every training
run is cached in the downstream run cache and reused).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import controlled, standin
from benchmarks.common import REPO, RESULTS_DIR, SEED_PATH, load_seed_rows, log, write_json_atomic

HELDOUT_FILES = (REPO / "data" / "eval_heldout.jsonl", REPO / "data" / "eval_large.jsonl")
DOWN_EVAL = REPO / "data" / "eval_large.jsonl"
DEFECT_KINDS = (*controlled.QUALITY_KINDS, *controlled.HARD_KINDS)
HELDOUT_NGRAM = 8  # the gate's contamination rule: a shared run of this many words

# the right answers to the controlled set's wrong-fact questions (controlled.WRONG_ANSWERS)
RIGHT_ANSWERS = {
    "What is the capital of France?": "The capital of France is Paris.",
    "How many legs does a spider have?": "A spider has eight legs; spiders are arachnids, not insects.",
    "What is the boiling point of water at sea level in Celsius?": "Water boils at 100 degrees Celsius at sea level.",
    "Who wrote the play Romeo and Juliet?": "Romeo and Juliet was written by William Shakespeare.",
    "What is the largest planet in our solar system?": "The largest planet in our solar system is Jupiter.",
    "What is 12 multiplied by 12?": "12 multiplied by 12 is 144.",
    "Which gas do plants absorb from the air for photosynthesis?": "Plants absorb carbon dioxide from the air for photosynthesis.",
    "What is the chemical symbol for gold?": "The chemical symbol for gold is Au.",
    "How many continents are there on Earth?": "There are seven continents on Earth.",
    "What is the freezing point of water in Fahrenheit?": "Water freezes at 32 degrees Fahrenheit.",
    "Who painted the Mona Lisa?": "The Mona Lisa was painted by Leonardo da Vinci.",
    "What is the square root of 81?": "The square root of 81 is 9.",
    "In which year did the first human land on the Moon?": "The first human landed on the Moon in 1969.",
    "What is the longest river in Africa?": "The longest river in Africa is the Nile.",
    "How many days are there in a leap year?": "A leap year has 366 days.",
    "What is the main language spoken in Brazil?": "The main language spoken in Brazil is Portuguese.",
    "What is the capital of Japan?": "The capital of Japan is Tokyo.",
    "How many sides does a hexagon have?": "A hexagon has six sides.",
    "What is the largest ocean on Earth?": "The largest ocean on Earth is the Pacific Ocean.",
    "Which planet is known as the Red Planet?": "Mars is known as the Red Planet because of the iron oxide on its surface.",
    "What is 15 plus 27?": "15 plus 27 is 42.",
    "Who developed the theory of general relativity?": "The theory of general relativity was developed by Albert Einstein.",
    "How many hours are there in a day?": "There are 24 hours in a day.",
    "What is the hardest natural substance?": "The hardest natural substance is diamond.",
    "What is the capital of Italy?": "The capital of Italy is Rome.",
    "How many bones are in the adult human body?": "The adult human body has 206 bones.",
    "What do bees make?": "Bees make honey, which they store in their hives.",
    "What is the chemical formula of water?": "The chemical formula of water is H2O.",
    "Which animal is the largest mammal?": "The largest mammal is the blue whale.",
    "What is 9 times 8?": "9 times 8 is 72.",
    "How many minutes are in an hour?": "There are 60 minutes in an hour.",
    "What is the tallest mountain on Earth?": "The tallest mountain on Earth is Mount Everest.",
}


def _words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() else " " for c in str(text)).split()


def _grams(text: str, n: int = HELDOUT_NGRAM) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def heldout_grams(files=HELDOUT_FILES, n: int = HELDOUT_NGRAM) -> tuple[set, set]:
    """(n-grams, whole normalised instructions) of the held-out files."""
    grams: set = set()
    questions: set = set()
    for f in files:
        if not Path(f).exists():
            continue
        for line in Path(f).read_text().splitlines():
            if line.strip():
                item = json.loads(line)
                questions.add(standin.norm(item["instruction"]).lower())
                for k in ("instruction", "input", "output"):
                    grams |= _grams(item.get(k) or "", n)
    return grams, questions


@dataclass
class CorruptedSet:
    rows: list[dict]  # the corrupted seed, with defect, kind, good (dict or None), clean (dict or None)
    clean: list[dict]  # its clean counterpart (instruction, input, output)
    reserve: list[dict]  # seed rows in neither (new tasks for the stand-in's neutral extensions)

    def seed_json(self) -> list[dict]:
        return [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in self.rows]


def build_corrupted(
    seed_rows: list[dict],
    *,
    n_clean: int = 110,
    n_quality: int = 40,
    n_hard: int = 24,
    n_isolated: int = 20,
    seed: int = 0,
) -> CorruptedSet:
    """The corrupted seed: ``n_clean`` clean rows, ``n_quality`` quality defects (the four kinds
    in turn), ``n_hard`` hard rows (the four kinds in turn), ``n_isolated`` isolated rows, in a
    seeded order. Wrong-fact questions that a held-out set asks (or shares a run of 8 words
    with), or that a seed row asks, are not used."""
    grams, questions = heldout_grams()
    asked = questions | {standin.norm(r["instruction"]).lower() for r in seed_rows}
    bank = [
        (q, a)
        for q, a in controlled.WRONG_ANSWERS
        if standin.norm(q).lower() not in asked and not (_grams(q) | _grams(RIGHT_ANSWERS[q])) & grams
    ]
    rng = random.Random(seed)
    order = list(range(len(seed_rows)))
    rng.shuffle(order)
    take = iter(order)
    used: set[int] = set()

    def pick() -> int:
        i = next(take)
        used.add(i)
        return i

    def row(ins, inp, out, defect, kind, category, good=None, clean=None) -> dict:
        return {
            "instruction": ins,
            "input": inp,
            "output": out,
            "defect": defect,
            "kind": kind,
            "category": category,
            "good": good,
            "clean": clean,
        }

    def plain(r: dict) -> dict:
        return {"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}

    rows: list[dict] = []
    prompts = {r["instruction"] for r in seed_rows}
    for _ in range(n_clean):
        r = seed_rows[pick()]
        rows.append(
            row(
                r["instruction"],
                r.get("input", ""),
                r["output"],
                "none",
                "clean",
                r.get("category", ""),
                clean=plain(r),
            )
        )
    rng.shuffle(bank)
    n_wrong = 0
    for j in range(n_quality):
        kind = controlled.QUALITY_KINDS[j % len(controlled.QUALITY_KINDS)]
        if kind == "wrong_answer":
            q, a = bank[n_wrong % len(bank)]
            n_wrong += 1
            good = {"instruction": q, "input": "", "output": RIGHT_ANSWERS[q]}
            rows.append(row(q, "", a, "quality", kind, "facts", good=good, clean=good))
            continue
        i = pick()
        r = seed_rows[i]
        cat = r.get("category", "")
        if kind == "unrelated_response":
            donors = [k for k in order if seed_rows[k].get("category", "") != cat]
            out = seed_rows[rng.choice(donors)]["output"]
            rows.append(row(r["instruction"], r.get("input", ""), out, "quality", kind, cat, plain(r), plain(r)))
        elif kind == "garbled_prompt":
            ins = controlled.garble(r["instruction"], rng)
            inp = controlled.garble(r.get("input", ""), rng) if r.get("input") else ""
            rows.append(row(ins, inp, r["output"], "quality", kind, cat, plain(r), plain(r)))
        else:  # cut as the controlled set cuts, longer when that prompt is taken: the stand-in
            # recognises a sample by its prompt alone
            words = r["instruction"].split()
            keep = len(controlled.truncate(r["instruction"], rng).split())
            while keep < len(words) and " ".join(words[:keep]) in prompts:
                keep += 1
            rows.append(row(" ".join(words[:keep]), "", r["output"], "quality", kind, cat, plain(r), plain(r)))
        prompts.add(rows[-1]["instruction"])
    for j in range(n_hard):
        kind = controlled.HARD_KINDS[j % len(controlled.HARD_KINDS)]
        i = pick()
        r = seed_rows[i]
        prompt, response = controlled.make_hard(r, kind, rng)
        rows.append(row(prompt, "", response, "hard", kind, r.get("category", ""), plain(r), plain(r)))
    iso = list(controlled.ISOLATED)
    rng.shuffle(iso)
    for q, a in iso[:n_isolated]:
        ext = controlled.EXTENSIONS.get(q)
        good = {"instruction": ext[0], "input": "", "output": ext[1]} if ext else None
        rows.append(
            row(q, "", a, "isolated", "isolated_topic", "isolated", good, {"instruction": q, "input": "", "output": a})
        )
    rng.shuffle(rows)
    for k, r in enumerate(rows):
        r["row"] = k
    reserve = [seed_rows[i] for i in range(len(seed_rows)) if i not in used]
    return CorruptedSet(rows=rows, clean=[r["clean"] for r in rows], reserve=reserve)


def oracle(cs: CorruptedSet) -> standin.Oracle:
    """What the stand-in knows about the corrupted seed (``standin.Oracle``)."""
    from middo_pipeline.core.schema import prompt_text

    def sample(d: dict, category: str = "") -> standin.Sample:
        return standin.Sample(prompt_text(d["instruction"], d.get("input", "")), d["output"], category)

    o = standin.Oracle()
    for r in cs.rows:
        key = standin.norm(prompt_text(r["instruction"], r["input"]))
        o.originals[key] = sample(r, r["category"])
        if r["good"] is not None:
            target = o.extensions if r["defect"] == "isolated" else o.good
            target[key] = sample(r["good"], r["category"])
    o.reserve = [sample(r, r.get("category", "")) for r in cs.reserve]
    return o


def tiny_knower(folder: Path, cs: CorruptedSet, epochs: float = 30.0) -> Path:
    """A tiny Llama that knows the clean data: built with a tokenizer trained on the set's text,
    then fully fine-tuned on the clean counterpart until it has learnt it. A random tiny model
    cannot tell a good answer from junk (every prompt explains its answer equally badly); this
    one can, as a real base model can for what it knows, so smoke runs and tests of the closed
    loop judge candidates in earnest, in seconds per step."""
    from middo_pipeline.core.schema import make_samples
    from middo_pipeline.core.training import TrainConfig, train_sft
    from middo_pipeline.models.tiny import build_tiny_model

    target = Path(folder) / "knower"
    if (target / "config.json").exists():
        return target
    texts = [r[k] for rows in (cs.rows, cs.clean, cs.reserve) for r in rows for k in ("instruction", "output")]
    blank = build_tiny_model(Path(folder) / "blank", texts=texts, vocab_size=1024, hidden_size=128)
    cfg = TrainConfig(
        lora=False, epochs=epochs, learning_rate=3e-3, batch_size=8, max_length=192, device="cpu", warmup_ratio=0.0
    )
    train_sft(str(blank), make_samples(cs.clean), target, cfg)
    return target


# ----------------------------------------------------------------------------------------------
# the loop


def run_loop(
    workdir: Path,
    seed_file: Path,
    rounds: int,
    *,
    env_extra: dict[str, str],
    config_file: Path | None = None,
    name: str = "loop",
) -> dict:
    """``middo loop --rounds R --seed FILE`` in a subprocess with its own Dagster home and
    storage under ``workdir``; its exit code, seconds and where its log went."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        {
            "DAGSTER_HOME": str(workdir / "dagster_home"),
            "MIDDO_HOME": str(workdir / "middo"),
            "MIDDO_STALL_ROUNDS": "0",
            **env_extra,
        }
    )
    (workdir / "dagster_home").mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "middo_pipeline.cli", "loop", "--rounds", str(rounds), "--seed", str(seed_file)]
    if config_file is not None:
        cmd += ["--config", str(config_file)]
    log_path = workdir / "loop.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=workdir).returncode
    seconds = time.perf_counter() - t0
    log(f"{name}: middo loop --rounds {rounds} exited {rc} after {seconds:.0f} s ({log_path})")
    return {"exit_code": rc, "seconds": round(seconds, 1), "log": str(log_path)}


def _key(instruction, input_, output) -> tuple[str, str, str]:
    return standin.norm(instruction), standin.norm(input_), standin.norm(output)


def round_report(workdir: Path, round_key: str, cs: CorruptedSet, decisions: list[dict]) -> dict:
    """What one round did to the data (see the module docstring, point 3)."""
    import polars as pl
    from dagster import DagsterInstance

    from middo_pipeline.core.storage import Storage
    from middo_pipeline.rounds import latest_metadata

    store = Storage(workdir / "middo")
    data = pl.read_parquet(store.table_path("round_dataset", round_key))
    out = pl.read_parquet(store.table_path("optimized_dataset", round_key))
    refined = pl.read_parquet(store.table_path("refined_samples", round_key))
    by_text = {_key(r["instruction"], r["input"], r["output"]): r for r in cs.rows}
    defect_of = {
        s["sample_id"]: (by_text.get(_key(s["instruction"], s["input"], s["output"])) or {}).get("kind", "added")
        for s in data.iter_rows(named=True)
    }
    by_prompt: dict[str, list[dict]] = {}
    for d in decisions:
        if d["new_prompt"] is not None:
            by_prompt.setdefault(standin.norm(d["new_prompt"]), []).append(d)

    def answer_kind(ins, output) -> str:
        cands = by_prompt.get(standin.norm(ins), [])
        for d in cands:
            if standin.norm(d["response"]) == standin.norm(output):
                return d["kind"]
        for d in cands:  # the pipeline cleaned the response (e.g. a pleasantry cut off): same prompt
            if standin.norm(output) and standin.norm(output) in standin.norm(d["response"]):
                return d["kind"]
        return "unknown"

    flagged: dict[str, int] = {}
    accepted: dict[str, dict[str, int]] = {}
    for r in refined.iter_rows(named=True):
        kind = defect_of.get(r["origin_id"], "added")
        flagged[kind] = flagged.get(kind, 0) + 1
        if r["status"] == "ok":
            a = answer_kind(r["instruction_after"], r["output_after"])
            accepted.setdefault(a, {}).setdefault(kind, 0)
            accepted[a][kind] += 1
    rnd = int(round_key.split("-")[1])
    mine = [d for d in decisions if d["request_seed"] is not None and int(d["request_seed"]) // 1000 == rnd]
    answers: dict[str, int] = {}
    for d in mine:
        answers[d["kind"]] = answers.get(d["kind"], 0) + 1
    before, after = set(data["sample_id"].to_list()), set(out["sample_id"].to_list())
    md: dict = {}
    with DagsterInstance.from_config(str(workdir / "dagster_home")) as instance:
        for asset in ("refined_samples", "optimized_dataset", "round_evaluation"):
            md[asset] = latest_metadata(instance, asset, round_key)
    ref_md, opt_md = md["refined_samples"], md["optimized_dataset"]
    return {
        "rows_in": data.height,
        "rows_out": out.height,
        "rows_removed": len(before - after),
        "rows_added": len(after - before),
        "defects_in": {k: v for k, v in _count(defect_of.values()).items() if k in DEFECT_KINDS},
        "flagged_by_kind": flagged,
        "accepted_by_answer": accepted,
        "repaired": sum(v for k, v in accepted.get("good", {}).items() if k in DEFECT_KINDS),
        "extended_good": accepted.get("good", {}).get("isolated_topic", 0),
        "junk_accepted": sum(sum(v.values()) for k, v in accepted.items() if k in standin.FAILURES),
        "standin_answers": answers,
        "standin_bad_answers": sum(v for k, v in answers.items() if k in standin.FAILURES),
        "prompt_style": ref_md.get("prompt_style"),
        "prompt_style_reason": ref_md.get("prompt_style_reason"),
        "acceptance_bar": ref_md.get("acceptance_bar"),
        "acceptance_bar_reason": ref_md.get("acceptance_bar_reason"),
        "rolled_back": bool(opt_md.get("rolled_back", False)),
        "optimized_metadata": {k: v for k, v in opt_md.items() if isinstance(v, (int, float, str, bool))},
    }


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------
# what to do with a flagged sample that could not be repaired

# the rules compared: which unrepaired samples (flagged hard or low quality, no replacement
# accepted) leave the next round's training data
UNREPAIRED_RULES = ("keep", "quarantine_all", "quarantine_ifd_ge_1", "quarantine_hard_and_low")


def unrepaired_sets(workdir: Path, round_key: str) -> dict[str, set[str]]:
    """The sample ids each rule of ``UNREPAIRED_RULES`` would take out of round ``round_key``'s
    merged data. IFD >= 1 is the absolute sign of misalignment (the prompt does not help explain
    the answer); below it Cherry-LLM finds the most instructive samples, so a relative threshold
    alone may take good samples out."""
    import polars as pl

    from middo_pipeline.core.storage import Storage

    store = Storage(workdir / "middo")
    refined = pl.read_parquet(store.table_path("refined_samples", round_key))
    quality = pl.read_parquet(store.table_path("quality_signals", round_key)).select("sample_id", "ifd")
    out = pl.read_parquet(store.table_path("optimized_dataset", round_key))
    repl = refined.filter(pl.col("operation").is_in(["simplified", "rewritten"]))
    unrepaired = repl.filter(pl.col("status") != "ok").join(
        quality, left_on="origin_id", right_on="sample_id", how="left"
    )
    unrepaired = unrepaired.filter(pl.col("origin_id").is_in(out["sample_id"].to_list()))  # still in the data
    both = pl.col("flags").str.contains("hard") & pl.col("flags").str.contains("low_quality")
    return {
        "keep": set(),
        "quarantine_all": set(unrepaired["origin_id"].to_list()),
        "quarantine_ifd_ge_1": set(unrepaired.filter(pl.col("ifd") >= 1.0)["origin_id"].to_list()),
        "quarantine_hard_and_low": set(unrepaired.filter(both)["origin_id"].to_list()),
    }


def unrepaired_study(workdir: Path, round_key: str, cs: CorruptedSet | None) -> dict:
    """Per rule: how many samples it takes out, and (on the corrupted seed) how many of them are
    defective by kind, how many clean, and how many defects stay in the data."""
    import polars as pl

    from middo_pipeline.core.storage import Storage

    out = pl.read_parquet(Storage(workdir / "middo").table_path("optimized_dataset", round_key))
    kind_of = {}
    if cs is not None:
        by_text = {_key(r["instruction"], r["input"], r["output"]): r["kind"] for r in cs.rows}
        kind_of = {
            s["sample_id"]: by_text.get(_key(s["instruction"], s["input"], s["output"]), "added")
            for s in out.iter_rows(named=True)
        }
    defects = {sid for sid, k in kind_of.items() if k in DEFECT_KINDS}
    res = {}
    for rule, ids in unrepaired_sets(workdir, round_key).items():
        row = {"removed": len(ids), "rows_left": out.height - len(ids)}
        if cs is not None:
            row["removed_by_kind"] = _count(kind_of.get(i, "added") for i in ids)
            row["defective_removed"] = len(ids & defects)
            row["clean_removed"] = sum(kind_of.get(i) == "clean" for i in ids)
            row["defects_left"] = len(defects - ids)
        res[rule] = row
    return res


def without(table, ids: set[str]):
    """``table`` (a sample table) without the rows in ``ids``."""
    import polars as pl

    return table.filter(~pl.col("sample_id").is_in(sorted(ids)))


# ----------------------------------------------------------------------------------------------
# downstream


def recovery(correct: dict[str, np.ndarray], name: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """(name − corrupted) / (clean − corrupted) of one measure (arrays: runs × items, higher is
    better), with a 95% interval from a bootstrap that resamples the items (the same for all
    three) and, per dataset, the runs."""
    sides = {k: np.atleast_2d(np.asarray(correct[k], dtype=np.float64)) for k in ("clean", "corrupted", name)}
    keep = np.all([np.isfinite(v).all(axis=0) for v in sides.values()], axis=0)
    sides = {k: v[:, keep] for k, v in sides.items()}
    n_items = int(keep.sum())
    rng = np.random.default_rng(seed)

    def boot(x: np.ndarray, items: np.ndarray) -> np.ndarray:
        runs = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
        per_run = np.stack([x[:, it].mean(axis=1) for it in items])  # (n_boot, runs)
        return np.take_along_axis(per_run, runs, axis=1).mean(axis=1)

    items = rng.integers(0, n_items, size=(n_boot, n_items))
    b = {k: boot(v, items) for k, v in sides.items()}
    gap = b["clean"] - b["corrupted"]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (b[name] - b["corrupted"]) / gap
    point_gap = sides["clean"].mean() - sides["corrupted"].mean()
    point = (sides[name].mean() - sides["corrupted"].mean()) / point_gap if point_gap else None
    finite = ratios[np.isfinite(ratios)]
    return {
        "ratio": None if point is None else float(point),
        "ci95": [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))] if finite.size else None,
        "gap_clean_minus_corrupted": float(point_gap),
        "gap_ci_includes_zero": bool(np.percentile(gap, 2.5) <= 0 <= np.percentile(gap, 97.5)),
    }


def downstream(datasets: dict, seeds: tuple[int, ...], settings, workdir: Path, partial: Path | None = None) -> dict:
    """Train on each dataset at every seed (one epoch, LoRA: the downstream benchmark's runs,
    cached in its run cache), evaluate on the 240-item set, and compare paired per item.
    Datasets in the order given, every seed of one before the next, so that a run stopped early
    has its first comparisons complete (written to ``partial`` after each dataset)."""
    from benchmarks.downstream import train_and_evaluate, train_config
    from middo_pipeline.core.evaluation import load_eval_set
    from middo_pipeline.core.schema import make_samples

    eval_df = load_eval_set(DOWN_EVAL)
    correct: dict[str, list] = {}
    neg_loss: dict[str, list] = {}
    runs: dict[str, list] = {}
    out: dict = {}
    for name, rows in datasets.items():
        df = rows if not isinstance(rows, list) else make_samples(rows)
        for s in seeds:
            c, loss, rec, cached = train_and_evaluate(
                settings, df, train_config(settings, s), eval_df, workdir / f"{name}-{s}"
            )
            correct.setdefault(name, []).append(c)
            neg_loss.setdefault(name, []).append(-loss)
            runs.setdefault(name, []).append({"seed": s, **rec, "reused": bool(cached)})
            log(
                f"closed_loop: {name} seed {s}: mc {rec['mc_accuracy']:.3f}, loss {rec['mean_response_loss']:.3f}"
                + (" (cached run)" if cached else "")
            )
        out = compare({"mc_accuracy": correct, "neg_response_loss": neg_loss}, runs)
        if partial is not None:
            write_json_atomic(partial, {"partial": True, "datasets_done": list(runs), **out})
    return out


def compare(measures: dict[str, dict[str, list]], runs: dict) -> dict:
    """Each dataset against the corrupted seed (paired per item, runs resampled too), the
    recovery ratio of every loop dataset, and which measure separates clean from corrupted more."""
    from benchmarks.downstream import runs_items

    out: dict = {"runs": runs, "vs_corrupted": {}, "recovery": {}}
    for m, table in measures.items():
        if "corrupted" not in table:
            continue
        for name in table:
            if name != "corrupted":
                out["vs_corrupted"].setdefault(m, {})[name] = runs_items(table[name], table["corrupted"])
        if "clean" not in table:
            continue
        for name in table:
            if name not in ("clean", "corrupted"):
                out["recovery"].setdefault(m, {})[name] = recovery({k: np.stack(v) for k, v in table.items()}, name)

    def z(m: str) -> float:  # the clean-minus-corrupted effect for its interval's width
        d = out["vs_corrupted"][m]["clean"]
        width = (d["ci95"][1] - d["ci95"][0]) or 1e-9
        return abs(d["mean"]) / width

    if all("clean" in out["vs_corrupted"].get(m, {}) for m in measures):
        out["sensitive_measure"] = max(measures, key=z)
    return out


# ----------------------------------------------------------------------------------------------
# the whole section


def run(
    settings,
    *,
    smoke: bool = False,
    ps=(0.7, 1.0, 0.0),
    rounds: int = 3,
    seeds=(0, 1, 2, 3, 4),
    bundled: bool = True,
    workroot: Path | None = None,
    one_round: tuple[float, ...] = (),
    only_datasets: tuple[str, ...] = (),
) -> dict:
    """The corrupted seed, the loop at each ``p`` (``rounds`` rounds; ``p = ps[0]`` is the one
    followed downstream round by round), the bundled optimizer, and the downstream comparison.
    ``only_datasets``: run no loop, train only these datasets (of the loops already done), e.g.
    ``clean,corrupted`` beside a running loop."""
    import polars as pl

    seed_rows = load_seed_rows(SEED_PATH)
    cs = (
        build_corrupted(seed_rows)
        if not smoke
        else build_corrupted(seed_rows, n_clean=30, n_quality=12, n_hard=8, n_isolated=6)
    )
    root = Path(workroot or RESULTS_DIR.parent / ".closed_loop").resolve()
    root.mkdir(parents=True, exist_ok=True)
    seed_file = root / "corrupted.json"
    text = json.dumps(cs.seed_json(), ensure_ascii=False, indent=1)
    if seed_file.exists() and seed_file.read_text() != text:
        raise RuntimeError(f"{root} holds loops of another corrupted seed: remove it, or give another --work")
    seed_file.write_text(text)
    (root / "clean.json").write_text(json.dumps(cs.clean, ensure_ascii=False, indent=1))
    profile = {"MIDDO_PROFILE": "tiny"} if smoke else {"MIDDO_PROFILE": "default"}
    config_file = None
    if smoke:
        config_file = root / "smoke.yaml"
        config_file.write_text(
            "ops:\n  sft_checkpoint:\n    config: {max_steps: 4, max_length: 128, batch_size: 8}\n"
            "  model_readouts:\n    config: {max_length: 128}\n  embedding_signals:\n    config: {umap: false}\n"
            "  round_evaluation:\n    config: {max_length: 128}\n"
        )
    out: dict = {
        "smoke": smoke,
        "corrupted_seed": {
            "rows": len(cs.rows),
            "defective": sum(r["defect"] in ("quality", "hard") for r in cs.rows),
            "by_kind": _count(r["kind"] for r in cs.rows),
        },
        "loops": {},
    }
    t0 = time.perf_counter()
    for p in ps:
        name = f"standin_p{p:g}"
        work = root / name
        n_rounds = 1 if p in one_round else rounds
        if only_datasets and not (work / "done.json").exists():
            continue
        if not (work / "done.json").exists():
            if work.exists():
                import shutil

                shutil.rmtree(work)
            server = standin.StandinServer(standin.Standin(oracle(cs), p=p, seed=settings.seed)).start()
            try:
                res = run_loop(
                    work, seed_file, n_rounds, env_extra={**server.env(), **profile}, config_file=config_file, name=name
                )
            finally:
                server.stop()
            (work / "decisions.json").write_text(json.dumps(server.decisions))
            if res["exit_code"] != 0:
                raise RuntimeError(f"{name}: middo loop failed, see {res['log']}")
            (work / "done.json").write_text(json.dumps(res))
        res = json.loads((work / "done.json").read_text())
        decisions = json.loads((work / "decisions.json").read_text())
        reports = {
            f"round-{r}": round_report(work, f"round-{r}", cs, decisions)
            for r in range(1, n_rounds + 1)
            if (work / "middo" / "tables" / "optimized_dataset" / f"round-{r}.parquet").exists()
        }
        out["loops"][name] = {"p": p, **res, "rounds": reports}
    if bundled and not (only_datasets and not (root / "bundled" / "done.json").exists()):
        work = root / "bundled"
        if not (work / "done.json").exists():
            res = run_loop(
                work,
                seed_file,
                1 if not smoke else rounds,
                env_extra={**profile},
                config_file=config_file,
                name="bundled",
            )
            if res["exit_code"] != 0:
                raise RuntimeError(f"bundled: middo loop failed, see {res['log']}")
            (work / "done.json").write_text(json.dumps(res))
        res = json.loads((work / "done.json").read_text())
        reports = {
            f"round-{r}": round_report(work, f"round-{r}", cs, [])
            for r in range(1, rounds + 1)
            if (work / "middo" / "tables" / "optimized_dataset" / f"round-{r}.parquet").exists()
        }
        out["loops"]["bundled"] = {"p": None, **res, "rounds": reports}
    out["loop_seconds"] = round(time.perf_counter() - t0, 1)

    lead = f"standin_p{ps[0]:g}"
    junk = sum(r["junk_accepted"] for loop in out["loops"].values() for r in loop["rounds"].values())
    bad = sum(r["standin_bad_answers"] for loop in out["loops"].values() for r in loop["rounds"].values())
    out["closed_loop_junk_accepted"] = {"accepted": junk, "bad_answers": bad}
    out["closed_loop_junk_share"] = junk / bad if bad else None
    repaired: dict[str, int] = {}
    for r in out["loops"].get(lead, {}).get("rounds", {}).values():
        for kind, n in r["accepted_by_answer"].get("good", {}).items():
            repaired[kind] = repaired.get(kind, 0) + n
    out["closed_loop_repaired_by_kind"] = repaired
    # what each unrepaired-sample rule would take out of each round's data (docs/decisions/unrepaired.md)
    from middo_pipeline.core.merge import DEFAULT_UNREPAIRED

    out["unrepaired_policy"] = {
        "default": DEFAULT_UNREPAIRED,
        "rules": {
            f"{name}_{rk}": unrepaired_study(root / name, rk, cs)
            for name, loop in out["loops"].items()
            for rk in loop["rounds"]
        },
    }

    if not seeds:
        return out
    # the comparisons the goals rest on first: clean vs corrupted, then the followed loop's round 2
    tables = {
        f"{name}_{rk}": root / name / "middo" / "tables" / "optimized_dataset" / f"{rk}.parquet"
        for name, loop in out["loops"].items()
        for rk in loop["rounds"]
    }
    last = f"round-{rounds}"
    order = [f"{lead}_round-2", f"{lead}_round-1", f"{lead}_{last}"]
    order += [f"{n}_{last}" for n in out["loops"] if n != lead] + [f"{n}_round-1" for n in out["loops"] if n != lead]
    datasets: dict = {"clean": cs.clean, "corrupted": cs.seed_json()}
    for key in [*order, *sorted(tables)]:
        if key in tables and key not in datasets:
            datasets[key] = pl.read_parquet(tables[key])
    if only_datasets:
        datasets = {k: v for k, v in datasets.items() if k in only_datasets}
    partial = root / ("downstream_partial.json" if not only_datasets else f"partial_{'_'.join(only_datasets)}.json")
    d = downstream(datasets, tuple(seeds), settings, root / "train", partial=partial)
    out["downstream"] = d
    m = d["sensitive_measure"]
    key = f"{lead}_round-2"
    if key in d["recovery"].get(m, {}):
        out["closed_loop_recovery"] = d["recovery"][m][key]["ratio"]
        out["closed_loop_recovery_ci"] = d["recovery"][m][key]["ci95"]
    out["closed_loop_clean_vs_corrupted"] = {k: d["vs_corrupted"][k]["clean"] for k in d["vs_corrupted"]}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["goals"] = goals(out)
    return out


def goals(out: dict) -> dict:
    """The issue's targets, in the shape the results table reads."""

    def goal(text: str, op: str, target: float, value) -> dict:
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        return {"goal": text, "target": f"{op} {target:g}", "value": value, "met": met}

    recovery = goal(
        "p = 0.7: recovery after round 2 on the more sensitive measure", ">=", 0.5, out.get("closed_loop_recovery")
    )
    gap = (out.get("closed_loop_clean_vs_corrupted") or {}).get((out.get("downstream") or {}).get("sensitive_measure"))
    if recovery["met"] and not (gap or {}).get("significant"):
        # a ratio over a gap that is not told from zero says nothing: the goal is not shown
        recovery.update(met=False, why="clean is not significantly better than corrupted: the ratio is undefined")
    return {
        "closed_loop_recovery": recovery,
        "closed_loop_junk_share": goal(
            "junk accepted, share of the stand-in's bad answers", "<=", 0.02, out.get("closed_loop_junk_share")
        ),
    }


def main(argv=None) -> int:
    from benchmarks.common import Settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, small seed: the whole path in minutes")
    ap.add_argument("--ps", default="0.7,1,0", help="stand-in p values; the first is followed round by round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one-round", default="", help="stand-in p values whose loop runs one round only")
    ap.add_argument("--only-datasets", default="", help="run no loop; train only these datasets (e.g. clean,corrupted)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the downstream training runs")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="training seeds downstream ('' = no downstream)")
    ap.add_argument("--no-bundled", action="store_true", help="skip the loop with the bundled optimizer")
    ap.add_argument("--work", default=None, help="work folder (kept: finished loops are reused)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/closed_loop.json)")
    args = ap.parse_args(argv)
    settings = Settings.quick(device="cpu", threads=args.threads)
    if args.smoke:
        settings.model = "tiny-llama"
    seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    res = run(
        settings,
        smoke=args.smoke,
        ps=tuple(float(p) for p in args.ps.split(",")),
        rounds=args.rounds,
        seeds=seeds,
        bundled=not args.no_bundled,
        workroot=Path(args.work) if args.work else None,
        one_round=tuple(float(p) for p in args.one_round.split(",") if p.strip()),
        only_datasets=tuple(d.strip() for d in args.only_datasets.split(",") if d.strip()),
    )
    default = RESULTS_DIR / ("closed_loop_smoke.json" if args.smoke else "closed_loop.json")
    path = write_json_atomic(Path(args.out) if args.out else default, res)
    log(f"closed_loop: results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
