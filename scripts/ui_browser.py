"""Drive a round from the Dagster UI in headless Chromium, as a user would: no shell in between.

    .venv/bin/python scripts/ui_browser.py [--out DIR] [--keep] [--port PORT --steps 3,4]

Starts `dagster dev` on 127.0.0.1 over a temporary DAGSTER_HOME / MIDDO_HOME with
MIDDO_PROFILE=tiny and a 40-sample seed (MIDDO_SEED_PATH), then, in the browser (Selenium
with Debian's `chromium` and `/usr/bin/chromedriver`; nothing is downloaded):

  1. schedule: turns `nightly_round` on, sees its next tick, and tests it: it skips, saying why
     (no seed yet);
  2. seed: materializes `seed_dataset` from its asset page, waits for the run's success;
  3. round-1: adds the partition from an asset's Materialize dialog, launches `middo_round`
     for it from the launchpad (the tiny preset pasted as config), waits for success;
  4. metadata: opens `loss_signals` → round-1 (figures first, rounded), opens the scatter
     plot with one click and sees it load; on `refined_samples` the counts, the outcome chart
     drawn inline and the before → after table;
  5. repair: re-materializes `quality_signals` round-1 from its launchpad (shift+click on
     Materialize) with another `m`, and sees the new m in its metadata (this Dagster, 1.13,
     draws no out-of-date mark on partitioned downstream assets);
  6. round-2: adds and launches it, then `round_evaluation`'s Plots view draws a figure over
     the two rounds.

A screenshot per step lands in --out (default ./ui-check/browser). Fails (exit 1) on a UI
error toast, a failed run or a missing element. `--port` drives a `dagster dev` already
running there instead of starting one (for working on a step); `--steps` picks steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dagster_dev  # noqa: E402
from dagster_dev import REPO  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
LOCATION = "middo_pipeline.definitions"


def browser_missing() -> str | None:
    """Why the browser test cannot run here, or None when it can."""
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found: apt-get install {pkg} (Debian's chromium and chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[dev]'"
    return None


class UIError(AssertionError):
    pass


class UI:
    """A headless Chromium on the Dagster UI, with the few moves a user makes."""

    def __init__(self, base: str, out: Path, log=print):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1600,1000",
            "--hide-scrollbars",
        ):
            opts.add_argument(arg)
        # explicit driver path: Selenium Manager (which downloads drivers) is never asked
        os.environ.setdefault("SE_OFFLINE", "true")
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        self.driver.set_page_load_timeout(60)
        self.base, self.out, self.log = base, out, log
        self.shots: list[str] = []

    def quit(self) -> None:
        self.driver.quit()

    # -- moves -------------------------------------------------------------------------------
    def go(self, path: str) -> None:
        self.driver.get(self.base + path)
        self.wait_js("return document.readyState === 'complete'", 30, f"page {path} loaded")
        self.dismiss_nux()

    def dismiss_nux(self) -> None:
        """The first-visit "Join the Dagster community" dialog: Skip, as a user would."""
        for b in self._find("//button[normalize-space()='Skip']"):
            if b.is_displayed():
                b.click()
                time.sleep(0.3)

    def _find(self, xpath: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.XPATH, xpath)

    def find(self, xpath: str, what: str, timeout: float = 30, quiet: bool = False):
        """The last visible element matching ``xpath`` (the innermost, for text matches)."""
        from selenium.common.exceptions import StaleElementReferenceException

        deadline = time.time() + timeout
        while True:
            self.check_toasts()
            try:
                self.dismiss_nux()
                els = [e for e in self._find(xpath) if e.is_displayed()]
            except StaleElementReferenceException:
                els = []  # the page re-rendered under us: look again
            if els:
                return els[-1]
            if time.time() > deadline:
                if not quiet:
                    self.shot(f"missing-{what.replace(' ', '_')[:40]}")
                raise UIError(f"missing element: {what} ({xpath}) on {self.driver.current_url}")
            time.sleep(0.5)

    def click(self, xpath: str, what: str, timeout: float = 30):
        """Click it; a re-render between finding and clicking (stale, covered) is retried."""
        from selenium.common.exceptions import ElementClickInterceptedException, StaleElementReferenceException

        deadline = time.time() + timeout
        while True:
            el = self.find(xpath, what, timeout)
            try:
                self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
                el.click()
                time.sleep(0.5)
                return el
            except (StaleElementReferenceException, ElementClickInterceptedException):
                if time.time() > deadline:
                    raise
                time.sleep(0.5)

    def open(self, xpath: str, what: str, expect: str, tries: int = 5):
        """Click until ``expect`` shows (a button clicked while the page still loads does nothing)."""
        for i in range(tries):
            self.click(xpath, what)
            try:
                last = i == tries - 1
                return self.find(expect, f"what {what} opens", timeout=20 if last else 6, quiet=not last)
            except UIError:
                if last:
                    raise
        return None

    def button(self, text: str, timeout: float = 30, starts: bool = False):
        cond = f"starts-with(normalize-space(), '{text}')" if starts else f"normalize-space()='{text}'"
        return self.click(f"//button[{cond}]", f"button {text}", timeout)

    def text(self, text: str, timeout: float = 30) -> None:
        """Wait until the page shows ``text`` (anywhere in its rendered text)."""
        deadline = time.time() + timeout
        while text not in self.body():
            self.check_toasts()
            self.dismiss_nux()
            if time.time() > deadline:
                self.shot(f"missing-text-{text.replace(' ', '_')[:30]}")
                raise UIError(f"missing text: {text!r} on {self.driver.current_url}")
            time.sleep(0.5)

    def type_into(self, xpath: str, what: str, value: str) -> None:
        el = self.find(xpath, what)
        el.click()
        el.send_keys(value)
        time.sleep(0.5)

    def body(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "body").text

    def wait_js(self, script: str, timeout: float, what: str):
        deadline = time.time() + timeout
        while True:
            value = self.driver.execute_script(script)
            if value:
                return value
            if time.time() > deadline:
                self.shot(f"timeout-{what.replace(' ', '_')[:40]}")
                raise UIError(f"timed out after {timeout:.0f} s waiting for {what} on {self.driver.current_url}")
            time.sleep(0.5)

    def check_toasts(self) -> None:
        """Fail on any error toast (Dagster draws them with the "error" icon)."""
        bad = self.driver.execute_script(
            """return Array.from(document.querySelectorAll('[class*=Toaster_toastInner]'))
                 .filter(t => t.querySelector('[aria-label=error], [data-icon=error]') ||
                              /error|failed/i.test(t.innerText))
                 .map(t => t.innerText)"""
        )
        if bad:
            self.shot("error-toast")
            raise UIError(f"UI error toast: {bad}")

    def shot(self, name: str) -> Path:
        path = self.out / f"{len(self.shots) + 1:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        self.shots.append(path.name)
        self.log(f"     screenshot {path.name}")
        return path

    def set_config(self, yaml_text: str) -> None:
        """Paste ``yaml_text`` into the launchpad's config editor (replacing what it holds)."""
        self.find("//div[contains(@class, 'CodeMirror')]", "config editor")
        self.driver.execute_script(
            "document.querySelector('.CodeMirror').CodeMirror.setValue(arguments[0]);", yaml_text
        )
        time.sleep(1)

    def wait_run(self, timeout: float) -> str:
        """On a run's page: wait until it ends; fail unless it succeeded. Returns the run id."""
        self.wait_js("return location.pathname.includes('/runs/')", 60, "the run page")
        run_id = self.driver.current_url.rstrip("/").split("/runs/")[-1].split("?")[0]
        status = self.wait_js(
            """const t = document.body.innerText;
               for (const s of ['Success', 'Failure', 'Canceled']) {
                 if (new RegExp('^' + s + '$', 'm').test(t)) return s; }
               return null;""",
            timeout,
            f"run {run_id[:8]} to end",
        )
        if status != "Success":
            self.shot(f"run-{run_id[:8]}-{status.lower()}")
            raise UIError(f"run {run_id} ended {status}")
        return run_id


# -- the steps ----------------------------------------------------------------------------
def round_config(eval_path: str, **quality) -> str:
    """The tiny preset (middo_pipeline/configs/tiny.yaml) with the small held-out file: what a
    user pastes into the launchpad."""
    import yaml

    from middo_pipeline.loop import load_run_config

    cfg = load_run_config("tiny")
    cfg.setdefault("resources", {})["evaluation"] = {"config": {"heldout_path": eval_path}}
    cfg["ops"]["quality_signals"]["config"].update(quality)
    cfg["execution"] = {"config": {"in_process": {}}}  # one process: no per-step interpreter start
    return yaml.safe_dump(cfg, sort_keys=False)


def add_partition(ui: UI, key: str, reuse: bool = False) -> None:
    """From an asset's Materialize dialog: "Add a partition", name it, save, close."""
    ui.go("/assets/round_dataset")
    add = "//*[normalize-space()='Add a partition']"
    ui.open("//button[starts-with(normalize-space(), 'Materialize')]", "Materialize", add)
    ui.click(add, "Add a partition link")
    ui.type_into("//div[contains(., 'Add a partition for')]//input[@type='text']", "partition name box", key)
    ui.button("Save")
    time.sleep(1)
    if reuse and "already exists" in ui.body():  # --port: an instance where it was added before
        ui.button("OK")
        ui.button("Cancel")
    ui.button("Cancel")


def pick_partition(ui: UI, key: str) -> None:
    """Type ``key`` into the launchpad's Partition box and pick it from the list (typing done
    while the page still renders is lost: typed again until the list offers it)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.keys import Keys

    option = f"//*[not(self::input)][normalize-space(text())='{key}']"
    for i in range(6):
        try:
            box = ui.find("//input[@placeholder='Partition']", "partition box")
            box.click()
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(Keys.BACKSPACE)
            box.send_keys(key)
            ui.click(option, f"{key} in the partition list", timeout=5 if i < 5 else 20)
            return
        except (UIError, WebDriverException):  # not offered yet, or re-rendered under us
            if i == 5:
                raise
            time.sleep(1)


def launch_round(ui: UI, key: str, config: str, timeout: float) -> str:
    ui.go(f"/locations/{LOCATION}/jobs/middo_round/playground")
    pick_partition(ui, key)
    ui.set_config(config)
    ui.text("No errors")
    ui.button("Launch Run")
    return ui.wait_run(timeout)


def step_schedule(ui: UI, ctx: dict) -> None:
    ui.go("/automation")
    ui.click("//a[contains(@href, '/schedules/nightly_round')]", "nightly_round link")
    ui.text("Latest tick")
    ui.find("//*[normalize-space()='Running']", "the Running row")
    toggle = ui._find("//input[@type='checkbox']")  # a styled switch: the input itself is hidden
    if not toggle:
        raise UIError("no Running switch on the schedule's page")
    if not toggle[0].is_selected():
        ui.driver.execute_script("arguments[0].click();", toggle[0])
    ui.text("Next tick")
    ui.shot("schedule-on-next-tick")
    ui.button("Preview tick result", starts=True)
    ui.button("Continue")
    ui.text("Skip reason", timeout=120)
    ui.text("not materialized yet")
    ui.shot("schedule-preview-skip-reason")
    ui.button("Close")


def step_seed(ui: UI, ctx: dict) -> None:
    ui.go("/assets/seed_dataset")
    ui.button("Materialize")
    if ui._find("//button[normalize-space()='Confirm']"):
        ui.button("Confirm")
    link = ui.find("//a[contains(@href, '/runs/')][normalize-space()='View']", "the launched run's View link")
    link.click()
    ui.wait_run(ctx["timeout"])
    ui.shot("seed-run-success")
    ui.go("/assets/seed_dataset")
    ui.text("rows")
    ui.shot("seed-dataset")


def step_round1(ui: UI, ctx: dict) -> None:
    add_partition(ui, "round-1", ctx["reuse"])
    launch_round(ui, "round-1", ctx["config"], ctx["timeout"])
    ui.shot("round-1-success")


IMAGES_LOADED = """const imgs = Array.from(document.querySelectorAll(arguments[0] + ' img'))
    .filter(i => i.src.startsWith('data:image/'));
  return imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0) ? imgs.length : 0;"""


def step_metadata(ui: UI, ctx: dict) -> None:
    ui.go("/assets/loss_signals?partition=round-1")
    for label in ("hard_fraction", "threshold_loss_after", "scatter", "hardest"):
        ui.text(label)
    ui.shot("loss_signals-round-1")
    # the scatter plot: one click on its "[Show Markdown]" opens it
    ui.click(
        "//tr[.//*[normalize-space()='scatter']]//*[normalize-space()='[Show Markdown]']", "the scatter's Show Markdown"
    )
    ui.wait_js(IMAGES_LOADED.replace("arguments[0]", "'[role=dialog]'"), 30, "the scatter image to load")
    ui.shot("loss_signals-scatter")
    ui.button("Close")
    # refinements: the counts first, the outcome chart drawn inline, the before → after table
    ui.go("/assets/refined_samples?partition=round-1")
    for label in ("accepted", "rejected", "outcome", "accepted_before_after"):
        ui.text(label)
    n = ui.wait_js(IMAGES_LOADED.replace("arguments[0]", "'table'"), 30, "the inline outcome chart")
    ctx["log"](f"     {n} inline chart(s) drawn")
    ui.shot("refined_samples-round-1")


def step_repair(ui: UI, ctx: dict) -> None:
    ui.go("/assets/quality_signals?partition=round-1")
    # shift+click on Materialize opens the launchpad ("Shift+click to add configuration")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    for _ in range(5):
        button = ui.find("//button[starts-with(normalize-space(), 'Materialize')]", "Materialize")
        ActionChains(ui.driver).key_down(Keys.SHIFT).click(button).key_up(Keys.SHIFT).perform()
        try:
            ui.wait_js("return !!document.querySelector('[role=dialog] .CodeMirror')", 10, "the launchpad")
            break
        except UIError:
            continue
    pick_partition(ui, "round-1")
    ui.set_config("execution:\n  config:\n    in_process: {}\nops:\n  quality_signals:\n    config:\n      m: [2.0]\n")
    ui.text("No errors")
    ui.shot("quality_signals-launchpad-m-2")
    ui.click("//*[@role='dialog']//button[normalize-space()='Materialize']", "the launchpad's Materialize")
    ui.wait_js(
        "return location.pathname.includes('/runs/') || "
        "!!document.querySelector('[class*=Toaster] a[href*=\"/runs/\"]')",
        60,
        "the launched run",
    )
    if "/runs/" not in ui.driver.current_url:
        ui.click("//*[contains(@class, 'Toaster')]//a[contains(@href, '/runs/')]", "the launched run's View link")
    ui.wait_run(ctx["timeout"])
    # the new materialization carries the new m (Dagster 1.13 draws no out-of-date mark on
    # partitioned downstream assets: refined_samples round-1 keeps its older materialization)
    ui.go("/assets/quality_signals?partition=round-1")
    ui.wait_js(
        """return Array.from(document.querySelectorAll('tr')).some(r => {
             const c = r.querySelectorAll('td');
             return c.length > 2 && c[0].innerText.trim() === 'm' && c[c.length - 1].innerText.trim() === '2'; });""",
        60,
        "quality_signals round-1 showing m = 2",
    )
    ui.shot("quality_signals-round-1-m-2")


def step_round2(ui: UI, ctx: dict) -> None:
    add_partition(ui, "round-2", ctx["reuse"])
    launch_round(ui, "round-2", ctx["config"], ctx["timeout"])
    ui.go("/assets/round_evaluation")
    ui.button("Plots")
    ui.wait_js(
        "return document.querySelectorAll('canvas, svg.recharts-surface').length > 0", 30, "a plot across rounds"
    )
    ui.shot("round_evaluation-plots")


STEPS = {
    1: ("schedule", step_schedule),
    2: ("seed", step_seed),
    3: ("round-1", step_round1),
    4: ("metadata", step_metadata),
    5: ("repair", step_repair),
    6: ("round-2", step_round2),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "ui-check" / "browser"), help="screenshots and report")
    ap.add_argument("--keep", action="store_true", help="keep the temporary instance")
    ap.add_argument("--port", type=int, help="drive a dagster dev already running on this port")
    ap.add_argument("--steps", default=",".join(map(str, STEPS)), help="which steps, e.g. 1,2,3")
    ap.add_argument("--run-timeout", type=float, default=600, help="seconds one run may take")
    args = ap.parse_args(argv)
    why = browser_missing()
    if why:
        print(f"skip: {why}")
        return 2
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tmp = Path(tempfile.mkdtemp(prefix="middo-ui-browser-"))
    sys.path.insert(0, str(REPO))
    from middo_pipeline_tests.conftest import write_small_eval, write_small_seed

    seed, eval_path = write_small_seed(tmp), write_small_eval(tmp)
    server = None
    t0 = time.time()
    timings: dict[str, float] = {}
    failure = None

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    try:
        port = args.port
        if port is None:
            from middo_pipeline.loop import DAGSTER_YAML

            (tmp / "dagster_home").mkdir()
            (tmp / "dagster_home" / "dagster.yaml").write_text(DAGSTER_YAML)
            env = dict(
                os.environ,
                DAGSTER_HOME=str(tmp / "dagster_home"),
                MIDDO_HOME=str(tmp / "middo"),
                MIDDO_PROFILE="tiny",
                MIDDO_DEVICE="cpu",
                MIDDO_SEED_PATH=str(seed),
                PYTHONUNBUFFERED="1",
            )
            server, port = dagster_dev.start(env, out / "dagster-dev.log")
        if not dagster_dev.wait_ready(port, timeout=180):
            raise UIError(f"dagster dev did not answer on port {port} within 180 s")
        log(f"dagster dev ready on 127.0.0.1:{port}")
        ui = UI(f"http://127.0.0.1:{port}", out, log)
        ctx = {
            "config": round_config(str(eval_path)),
            "timeout": args.run_timeout,
            "log": log,
            "reuse": bool(args.port),
        }
        try:
            for n in [int(s) for s in args.steps.split(",") if s.strip()]:
                name, fn = STEPS[n]
                log(f"step {n}: {name}")
                s0 = time.time()
                try:
                    fn(ui, ctx)
                except Exception:
                    ui.shot(f"failed-step-{n}")
                    raise
                ui.check_toasts()
                timings[name] = round(time.time() - s0, 1)
                log(f"ok   step {n}: {name} ({timings[name]} s)")
        finally:
            ui.quit()
    except Exception as exc:  # noqa: BLE001 - reported, and the exit status says it failed
        failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"
        log(f"FAIL {failure}")
    finally:
        if server is not None:
            dagster_dev.stop(server)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    report = {"failure": failure, "step_seconds": timings, "total_seconds": round(time.time() - t0, 1)}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log(f"{'FAILED' if failure else 'passed'}; screenshots in {out}")
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
