"""Start `dagster dev` on 127.0.0.1 over a fresh instance, run one tiny round, then check the UI.

    .venv/bin/python scripts/ui_check.py [--out DIR] [--rounds N] [--keep]

1. a temporary DAGSTER_HOME / MIDDO_HOME, MIDDO_PROFILE=tiny (seconds per round);
2. `middo loop --rounds N --config tiny` on a 40-sample slice of the seed data;
3. `dagster dev -h 127.0.0.1` in its own process group, waited for on /server_info;
4. GraphQL: the asset graph has the round's lineage from seed_dataset to round_evaluation,
   the round partitions exist, assets carry their metadata (plots, previews) and checks;
5. headless Chromium (Debian's `chromium`) screenshots of the lineage graph and an asset's
   page, saved to --out; skipped with a note when chromium is not installed;
6. one SIGTERM to the process group stops the server (ENVIRONMENT.md: start it after set -m).

Exits non-zero on any failed check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dagster_dev  # noqa: E402
from dagster_dev import BIN, REPO, gql  # noqa: E402

LINEAGE = [
    "seed_dataset",
    "round_dataset",
    "sft_checkpoint",
    "model_readouts",
    "loss_signals",
    "embedding_signals",
    "quality_signals",
    "refined_samples",
    "optimized_dataset",
    "round_evaluation",
]


ASSETS_Q = """
query {
  assetNodes { assetKey { path } groupName dependencyKeys { path } partitionKeysByDimension { partitionKeys } }
}"""

MATERIALIZATION_Q = """
query($path: [String!]!, $partition: String!) {
  assetOrError(assetKey: {path: $path}) {
    ... on Asset {
      assetMaterializations(partitions: [$partition], limit: 1) {
        partition
        metadataEntries { label __typename ... on MarkdownMetadataEntry { mdStr } }
      }
      definition { assetChecksOrError { ... on AssetChecks { checks { name executionForLatestMaterialization { status } } } } }
    }
  }
}"""


def check(cond: bool, what: str, failures: list[str]) -> None:
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def screenshot(url: str, out: Path) -> bool:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser:
        print(f"skip screenshot {out.name}: no chromium (apt-get install chromium)")
        return False
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1600,1000",
        "--virtual-time-budget=20000",
        f"--screenshot={out}",
        url,
    ]
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    ok = out.exists() and out.stat().st_size > 10_000
    print(f"{'ok  ' if ok else 'FAIL'} screenshot {out} ({out.stat().st_size if out.exists() else 0} bytes)")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "ui-check"), help="where screenshots and the report go")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the temporary instance")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="middo-ui-"))
    env = dict(
        os.environ,
        DAGSTER_HOME=str(tmp / "dagster_home"),
        MIDDO_HOME=str(tmp / "middo"),
        MIDDO_PROFILE="tiny",
        MIDDO_DEVICE="cpu",
        PYTHONUNBUFFERED="1",
    )
    (tmp / "dagster_home").mkdir()
    from middo_pipeline.loop import DAGSTER_YAML

    (tmp / "dagster_home" / "dagster.yaml").write_text(DAGSTER_YAML)
    seed = json.loads((REPO / "data" / "seed_alpaca.json").read_text())[:40]
    (tmp / "seed.json").write_text(json.dumps(seed))
    failures: list[str] = []

    t0 = time.time()
    run = subprocess.run(
        [
            str(BIN / "middo"),
            "loop",
            "--rounds",
            str(args.rounds),
            "--config",
            "tiny",
            "--seed",
            str(tmp / "seed.json"),
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    (out / "loop.log").write_text(run.stdout + run.stderr)
    check(run.returncode == 0, f"middo loop --rounds {args.rounds} (tiny) in {time.time() - t0:.0f}s", failures)
    if run.returncode != 0:
        print(run.stdout[-3000:], run.stderr[-3000:])
        return 1

    server, port = dagster_dev.start(env, out / "dagster-dev.log")
    try:
        if not dagster_dev.wait_ready(port, timeout=180):
            check(False, "dagster dev answered with the asset graph within 180 s", failures)
            return 1
        nodes = gql(port, ASSETS_Q)["assetNodes"]
        by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
        check(all(k in by_key for k in LINEAGE), "asset graph has every asset of the round's lineage", failures)
        deps = {k: {"/".join(d["path"]) for d in n["dependencyKeys"]} for k, n in by_key.items()}
        edges = [
            ("round_dataset", "seed_dataset"),
            ("sft_checkpoint", "round_dataset"),
            ("model_readouts", "sft_checkpoint"),
            ("loss_signals", "model_readouts"),
            ("refined_samples", "quality_signals"),
            ("optimized_dataset", "refined_samples"),
        ]
        check(all(b in deps.get(a, set()) for a, b in edges), "lineage edges seed → … → optimized_dataset", failures)
        parts = by_key.get("loss_signals", {}).get("partitionKeysByDimension") or [{}]
        keys = parts[0].get("partitionKeys", [])
        check(f"round-{args.rounds}" in keys, f"round partitions listed: {keys}", failures)

        for asset, labels in [
            ("sft_checkpoint", ["loss_curve", "steps"]),
            ("loss_signals", ["scatter", "threshold_loss_after"]),
            ("quality_signals", ["histograms", "lowest_scored"]),
            ("optimized_dataset", ["rows_after", "before_after"]),
            ("round_evaluation", ["mc_accuracy", "by_round"]),
        ]:
            data = gql(port, MATERIALIZATION_Q, {"path": [asset], "partition": "round-1"})["assetOrError"]
            mats = data.get("assetMaterializations") or []
            have = {e["label"] for e in mats[0]["metadataEntries"]} if mats else set()
            check(set(labels) <= have, f"{asset} round-1 metadata has {labels}", failures)
            if asset in ("optimized_dataset", "loss_signals"):
                checks = data["definition"]["assetChecksOrError"].get("checks", [])
                statuses = {c["name"]: (c["executionForLatestMaterialization"] or {}).get("status") for c in checks}
                check(
                    bool(statuses) and all(s in ("SUCCEEDED", "FAILED") for s in statuses.values()),
                    f"{asset} checks ran: {statuses}",
                    failures,
                )

        base = f"http://127.0.0.1:{port}"
        gql(port, "mutation { setNuxSeen }")  # the first-visit community dialog would cover the pages
        shots = [
            ("lineage.png", f"{base}/asset-groups"),
            ("round_job_graph.png", f"{base}/locations/middo_pipeline.definitions/jobs/middo_round"),
            ("asset_loss_signals.png", f"{base}/assets/loss_signals?partition=round-1"),
            ("asset_round_evaluation.png", f"{base}/assets/round_evaluation?partition=round-1"),
            ("runs.png", f"{base}/runs"),
        ]
        for name, url in shots:
            screenshot(url, out / name)
    finally:
        stopped = dagster_dev.stop(server)
        print(f"dagster dev stopped (exit {server.returncode})")
        check(stopped, "dagster dev stopped on SIGTERM within 30 s", failures)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    (out / "report.json").write_text(json.dumps({"failures": failures}, indent=1))
    print(f"{len(failures)} failed checks; screenshots and logs in {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
