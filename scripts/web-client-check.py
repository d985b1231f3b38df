#!/usr/bin/env python3
"""Drives the upstream BLOOM web client, served by bloom-api (BLOOM_WEB_DIR), in headless
Chromium: every page, the calls its buttons make, and a screenshot of each step.

    python3 scripts/web-client-check.py --base http://127.0.0.1:3002 --agent node-a --out shots/

Needs Debian's chromium and `pip install playwright`. With --agent (the id of an HTTP
agent that runs tasks), a task created with "Create & Dispatch" must reach `completed`
in the task table, and the agent's health check must answer. Exits non-zero when a page
does not render, a call answers 404 or 5xx other than a 502 passed on from an agent or
membridge, or the browser logs a script error.
"""
import argparse
import os
import re
import sys
import time

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="http://127.0.0.1:3002")
    ap.add_argument("--agent", help="id of an HTTP agent that runs tasks")
    ap.add_argument("--out", default="web-client-shots")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    problems, passed_on = [], []
    # Once the check's project is deleted, the page's polls of it answer 404, as upstream's.
    cleaning_up = []

    def on_response(r):
        if "/api/" not in r.url or cleaning_up:
            return
        if r.status == 502:
            passed_on.append(f"{r.request.method} {r.url}")
        elif r.status == 404 or r.status >= 500:
            problems.append(f"{r.status} {r.request.method} {r.url}")

    def on_console(m):
        # Fonts and other resources from the internet are not reachable offline.
        if cleaning_up:
            return
        if m.type == "error" and "ERR_NAME_NOT_RESOLVED" not in m.text and "status of 502" not in m.text:
            problems.append(f"console: {m.text}")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("response", on_response)
        page.on("console", on_console)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        shot = lambda name: page.screenshot(path=os.path.join(args.out, f"{name}.png"), full_page=True)
        testid = lambda t: f'[data-testid="{t}"]'

        # Runtime: the proxy tab, then a task created and dispatched from the Tasks tab.
        page.goto(f"{args.base}/runtime")
        page.wait_for_selector(testid("text-page-title"))
        page.click(testid("button-test-connection"))
        time.sleep(1.5)
        shot("1-runtime-proxy")
        page.click(testid("tab-tasks"))
        prompt = f"web client check {int(time.time())}"
        page.fill(testid("input-task-prompt"), prompt)
        page.fill(testid("input-task-context"), "web-client-check")
        with page.expect_response(lambda r: r.url.endswith("/api/runtime/llm-tasks") and r.request.method == "POST") as created:
            page.click(testid("button-create-task"))
        task_id = created.value.json()["id"]
        if args.agent:
            row = page.locator(testid(f"row-task-{task_id}"))
            deadline = time.time() + 60
            while "completed" not in row.inner_text() and time.time() < deadline:
                time.sleep(2)
                page.click(testid("button-refresh-tasks"))
            if "completed" not in row.inner_text():
                problems.append(f"task {task_id} did not reach completed: {row.inner_text()!r}")
        shot("2-runtime-tasks")
        page.click(testid("tab-overview"))
        time.sleep(1)
        shot("3-runtime-overview")

        # Nodes: the fleet, an agent's health check, a node registered by hand.
        page.goto(f"{args.base}/nodes")
        page.wait_for_selector(testid("text-nodes-title"))
        time.sleep(1.5)
        if args.agent:
            with page.expect_response(re.compile(r".*/agent-health$")) as health:
                page.click(testid(f"button-health-{args.agent}"))
            if not health.value.json().get("reachable"):
                problems.append(f"agent {args.agent} not reachable: {health.value.json()}")
            time.sleep(1)
        shot("4-nodes")
        page.fill(testid("input-node-name"), "web-client-check-node")
        page.fill(testid("input-node-url"), "http://127.0.0.1:9")
        page.click(testid("button-register-node"))
        time.sleep(1.5)
        shot("5-nodes-registered")
        page.click(testid("button-remove-node-web-client-check-node"))
        time.sleep(1)

        # Membridge: a managed project, its node status, and membridge's own view.
        page.goto(f"{args.base}/membridge")
        page.wait_for_selector(testid("text-membridge-title"))
        time.sleep(1.5)
        page.fill(testid("input-project-name"), f"check-{int(time.time())}")
        page.fill(testid("input-repo-url"), "https://example.invalid/repo.git")
        if args.agent:
            page.fill(testid("input-primary-node"), args.agent)
        page.click(testid("button-create-project"))
        time.sleep(2)
        card = page.locator('[data-testid^="card-managed-project-"]').first
        card.click()
        time.sleep(1.5)
        shot("6-membridge")
        cleaning_up.append(True)
        page.locator('[data-testid^="button-delete-"]').first.click()
        time.sleep(1)
        browser.close()

    for p in passed_on:
        print(f"502 passed on from an agent or membridge: {p}")
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    print(f"screenshots in {args.out}; {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
