"""Browser test of the operator dashboard (/ui) in real headless Chromium.

Run by scripts/dashboard-check.sh against a running runtime (bloom-api with an API key,
a reconciler and a worker with the built-in executor). Submits real tasks, then checks
that each page loads without console errors, the API key is asked for and enforced,
filters and pagination work, cancel and requeue change the database, and a live page
updates without a reload. Saves a screenshot of each page.
"""

import argparse
import http.server
import json
import pathlib
import re
import subprocess
import sys
import threading
import time
import urllib.request

from playwright.sync_api import expect, sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]


class Api:
    def __init__(self, base, key):
        self.base, self.key = base, key

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("X-Runtime-Api-Key", self.key)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def submit(self, prompt, context="ui", agent="ui-agent"):
        return self.call("POST", "/api/runtime/llm-tasks",
                         {"context_id": context, "agent_slug": agent, "prompt": prompt})["id"]

    def status(self, task_id):
        return self.call("GET", f"/api/runtime/llm-tasks/{task_id}")["status"]


class FakeAgent(http.server.BaseHTTPRequestHandler):
    """A membridge agent's HTTP API as the runtime calls it: GET /health, POST /restart."""

    calls = []

    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        FakeAgent.calls.append(("GET", self.path))
        if self.path == "/health":
            self.reply({"status": "ok", "version": "0.4.0-ui", "hostname": "ui-host"})
        else:
            self.send_error(404)

    def do_POST(self):
        FakeAgent.calls.append(("POST", self.path))
        if self.path == "/restart":
            self.reply({"ok": True})
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


def fake_agent():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeAgent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def wait(what, check, state=lambda: "", timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.2)
    sys.exit(f"timed out waiting for {what}: {state()}")


def filter_tasks(page, query):
    """Submits the task filter and waits for the page drawn for exactly `query` (the hash's
    query string): until then the previous page, and its form, are still on screen."""
    page.click("form.filters button[type=submit]")
    expect(page.locator(f'form.filters[data-query="{query}"]')).to_have_count(1)


def db_query(database_url, sql):
    out = subprocess.run(["psql", database_url, "-Atc", sql], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def db_status(database_url, task_id):
    return db_query(database_url, f"SELECT status FROM llm_tasks WHERE id = '{task_id}'")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--database-url", required=True)
    ap.add_argument("--screenshots", required=True)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    shots = pathlib.Path(args.screenshots)
    shots.mkdir(parents=True, exist_ok=True)
    api = Api(args.base, args.api_key)

    # A concurrency limit and a budget, shown on the workers page.
    api.call("PUT", "/api/runtime/concurrency-limits/agent_slug/slow", {"max_running": 2})
    api.call("PUT", "/api/runtime/budgets/agent_slug/critic/usd-per-day", {"max": 5})

    # Real tasks: 56 that complete (more than one page of 50), 2 that fail, 1 that runs long.
    done = [api.submit(f"hello {i}", context=f"ctx-{i % 4}") for i in range(56)]
    failed = [api.submit("fail: the model refused", agent="critic") for _ in range(2)]
    long_run = api.submit("sleep:60000", agent="slow")
    wait("the tasks to finish", lambda: all(api.status(t) == "completed" for t in done[-3:])
         and all(api.status(t) == "failed" for t in failed) and api.status(long_run) in ("leased", "running"),
         lambda: {t: api.status(t) for t in done[-3:] + failed + [long_run]})

    problems, console_errors, refused = [], [], []
    signed_in = [False]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1366, "height": 860})

        def on_console(msg):
            if msg.type == "error":
                console_errors.append(f"{msg.text} ({msg.location.get('url')})")

        page.on("console", on_console)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("response", lambda r: r.status == 401 and refused.append(signed_in[0]))

        # Auth: the key is asked for; a wrong one is refused; the right one opens the page.
        page.goto(args.base + "/ui")
        dialog = page.locator("#login")
        expect(dialog).to_be_visible()
        page.fill("#login-key", "wrong-key")
        page.click("#login-form button[type=submit]")
        expect(page.locator("#login-error")).to_have_text("That key was refused.")
        page.fill("#login-key", args.api_key)
        page.click("#login-form button[type=submit]")
        expect(dialog).to_be_hidden()
        expect(page.locator("h1")).to_have_text("Overview")
        signed_in[0] = True
        cards = page.locator("#task-cards")
        expect(cards).to_contain_text("59")  # the total
        charts = page.locator("#charts svg")
        expect(charts).to_have_count(3)
        # The runs are drawn (the label reads the series' peaks).
        expect(charts.nth(0)).to_have_attribute("aria-label", re.compile(r"completed peak [1-9]"))
        expect(charts.nth(1)).to_have_attribute("aria-label", re.compile(r"p50 peak \d+"))
        # Connections: Postgres and NATS reached; membridge (pointed at a closed port) not,
        # and the reconcilers' agent sync, which ran as soon as one led, failing.
        conns = page.locator("#connections")
        expect(conns.locator("dd").nth(0)).to_have_text("connected")
        expect(conns.locator("dd").nth(1)).to_have_text("connected")
        expect(conns.locator("dd").nth(2)).to_have_text(re.compile(r"^(not called yet|disconnected.*)$"))
        expect(conns.locator("dd").nth(3)).to_have_text(re.compile(r"^failing: .+, last run \d{4}-"), timeout=15000)
        page.screenshot(path=str(shots / "overview.png"), full_page=True)

        # Live: a task submitted now appears in the total without a reload.
        api.submit("hello live")
        expect(cards).to_contain_text("60", timeout=10000)

        # Tasks: the first page holds 50, the next one the rest; a filter narrows it.
        page.click("nav >> text=Tasks")
        expect(page.locator("h1")).to_have_text("Tasks")
        expect(page.locator("tbody tr")).to_have_count(50)
        expect(page.locator("main")).not_to_contain_text("null")
        page.screenshot(path=str(shots / "tasks.png"), full_page=True)
        page.click("#next-page")
        expect(page.locator("tbody tr")).to_have_count(10)
        page.select_option("#f-status", "failed")
        filter_tasks(page, "status=failed")
        expect(page.locator("tbody tr")).to_have_count(2)
        # A time range after every task: none; before every task: none either.
        page.select_option("#f-status", "")
        page.fill("#f-from", "2100-01-01T00:00")
        filter_tasks(page, "from=2100-01-01T00%3A00")
        expect(page.locator("main")).to_contain_text("No task matches.")
        page.fill("#f-from", "")
        page.fill("#f-to", "2000-01-01T00:00")
        filter_tasks(page, "to=2000-01-01T00%3A00")
        expect(page.locator("main")).to_contain_text("No task matches.")
        page.fill("#f-to", "")
        page.fill("#f-agent_slug", "nobody")
        filter_tasks(page, "agent_slug=nobody")
        # The page of that filter offers to cancel the agent's tasks.
        expect(page.locator("#cancel-matching")).to_be_visible()
        expect(page.locator("main")).to_contain_text("No task matches.")
        # The start of the prompt, ignoring case: the two failing tasks.
        page.fill("#f-agent_slug", "")
        page.fill("#f-prompt_prefix", "FAIL: THE")
        filter_tasks(page, "prompt_prefix=FAIL%3A+THE")
        expect(page.locator("tbody tr")).to_have_count(2)
        expect(page.locator("tbody")).to_contain_text("critic")

        # A failed task: why it failed, then requeued from the page.
        page.goto(f"{args.base}/ui#/tasks/{failed[0]}")
        expect(page.locator("h1")).to_contain_text(failed[0])
        expect(page.locator("main")).to_contain_text("the model refused")
        page.screenshot(path=str(shots / "task-failed.png"), full_page=True)
        page.click("button:has-text('Requeue')")
        expect(page.locator("#action-result")).to_contain_text("Requeue: the task is now queued")
        assert db_query(args.database_url, f"SELECT count(*) FROM audit_logs WHERE entity_id = '{failed[0]}' "
                        "AND action = 'task_requeued'") == "1", "the requeue is in the database"

        # Failures, grouped by reason; a group requeued in bulk after its count and cost.
        wait("the requeued task to fail again", lambda: db_status(args.database_url, failed[0]) == "failed")
        page.click("nav >> text=Failures")
        expect(page.locator("h1")).to_have_text("Failures")
        row = page.locator("tbody tr", has_text="the model refused")
        expect(row).to_contain_text("critic")
        expect(row.locator("td").nth(3)).to_have_text("2")
        page.screenshot(path=str(shots / "failures.png"), full_page=True)
        row.locator("button").click()
        expect(page.locator("#bulk-summary")).to_contain_text("Requeue 2 critic tasks that failed with execution")
        expect(page.locator("#bulk-summary")).to_contain_text("cost")
        page.click("#bulk-confirm")
        expect(page.locator("#bulk-result")).to_have_text("Requeued 2 tasks.")
        assert db_query(args.database_url, "SELECT count(*) FROM audit_logs WHERE action = 'task_requeued'") == "3"

        # A filter's queued or running tasks cancelled in bulk, after their count.
        bulk = [api.submit("sleep:60000", agent="bulk") for _ in range(3)]
        page.goto(f"{args.base}/ui#/tasks?agent_slug=bulk")
        expect(page.locator("tbody tr")).to_have_count(3)
        page.click("#cancel-matching")
        expect(page.locator("#bulk-summary")).to_contain_text("Cancel 3 queued, leased or running tasks")
        page.click("#bulk-confirm")
        expect(page.locator("#bulk-result")).to_have_text("Cancelled 3 tasks.")
        for t in bulk:
            assert db_status(args.database_url, t) == "cancelled", t

        # The running task: cancelled from its page, in the database too.
        page.goto(f"{args.base}/ui#/tasks/{long_run}")
        expect(page.locator("h1")).to_contain_text(re.compile("leased|running"))
        page.click("button:has-text('Cancel')")
        expect(page.locator("#action-result")).to_contain_text("Cancel: the task is now cancelled")
        wait("the cancel in the database", lambda: db_status(args.database_url, long_run) == "cancelled", timeout=10)
        expect(page.locator("h1")).to_contain_text("cancelled")  # the page shows it after the action
        expect(page.locator("main")).to_contain_text("task_cancelled")
        page.screenshot(path=str(shots / "task-cancelled.png"), full_page=True)

        # A completed task shows its result and artifact.
        page.goto(f"{args.base}/ui#/tasks/{done[0]}")
        expect(page.locator("main")).to_contain_text("hello 0")
        expect(page.locator("main")).to_contain_text("Artifacts (1)")
        expect(page.locator("main")).to_contain_text("Leases (1)")
        for action in ("task_created", "task_leased", "task_completed"):
            expect(page.locator("main")).to_contain_text(action)

        # Workers and audit. A provider's rate limit holds one API key's tasks (the row a
        # rate-limited run's result writes; the API's side is tested on its own).
        until = int(time.time() * 1000) + 600_000
        db_query(args.database_url, "INSERT INTO provider_holds (scope, key, until, reason, updated_at) "
                 f"VALUES ('concurrency_key', 'team-a', {until}, 'rate_limited: usage limit reached', {until - 600_000})")
        page.click("nav >> text=Workers")
        expect(page.locator("main")).to_contain_text("ui-worker")
        expect(page.locator("main")).to_contain_text("usd-per-day")
        held = page.locator("table", has_text="rate_limited: usage limit reached")
        expect(held.locator("tbody tr")).to_have_count(1)
        expect(held).to_contain_text("concurrency_key")
        expect(held).to_contain_text("team-a")
        page.screenshot(path=str(shots / "workers.png"), full_page=True)
        page.click("nav >> text=Audit")
        expect(page.locator("main")).to_contain_text("task_cancelled")
        # Filtered by action: only cancellations, as many as Postgres holds; the filter
        # stays in its input while the live tail refreshes.
        page.fill("#a-action", "task_cancelled")
        page.click("form.filters >> text=Filter")
        expect(page).to_have_url(re.compile(r"#/audit\?action=task_cancelled"))
        cancellations = int(db_query(args.database_url, "SELECT count(*) FROM audit_logs WHERE action = 'task_cancelled'"))
        rows = page.locator("#audit-entries tbody tr")
        expect(rows).to_have_count(cancellations)
        for i in range(cancellations):
            expect(rows.nth(i).locator("td").nth(1)).to_have_text("task_cancelled")
        page.fill("#a-actor", "typed, not submitted")
        page.wait_for_timeout(6000)
        expect(page.locator("#a-actor")).to_have_value("typed, not submitted")
        page.screenshot(path=str(shots / "audit.png"), full_page=True)
        # By entity: one task's trail.
        page.goto(f"{args.base}/ui#/audit?entity_id={done[0]}")
        expect(page.locator("#audit-entries")).to_contain_text("task_completed")
        expect(page.locator("#audit-entries")).not_to_contain_text("task_cancelled")

        # An HTTP agent's page: its health checked and a restart asked for, both reaching
        # the agent. Registered without the Claude CLI, so no task is sent to it.
        agent_url = fake_agent()
        agent = api.call("POST", "/api/runtime/workers", {"name": "ui-http-agent", "url": agent_url,
                                                          "capabilities": {"claude_cli": False, "max_concurrency": 1}})
        page.goto(f"{args.base}/ui#/workers")
        page.click(f"a[href='#/workers/{agent['id']}']")
        expect(page.locator("h1")).to_contain_text(agent["id"])
        page.click("#agent-health")
        expect(page.locator("#worker-result")).to_have_text("Reachable: agent version 0.4.0-ui.")
        expect(page.locator("dl.kv")).to_contain_text("0.4.0-ui")  # the record, reloaded
        assert db_query(args.database_url, f"SELECT agent_version FROM workers WHERE id = '{agent['id']}'") == "0.4.0-ui"
        page.click("#agent-restart")
        page.click("#bulk-confirm")
        expect(page.locator("#bulk-result")).to_have_text("The agent was asked to restart.")
        assert ("POST", "/restart") in FakeAgent.calls, FakeAgent.calls
        assert db_query(args.database_url, "SELECT count(*) FROM audit_logs WHERE action = 'agent_restarted'") == "1"
        page.screenshot(path=str(shots / "worker.png"), full_page=True)
        # A NATS worker's page lists its active leases.
        page.goto(f"{args.base}/ui#/workers/ui-worker")
        expect(page.locator("main")).to_contain_text("NATS worker")
        expect(page.locator("main")).to_contain_text("Active leases")
        # Drained from its page: a task submitted then waits (the only worker takes
        # nothing new) until it is resumed from the same page.
        page.click("#worker-drain")
        expect(page.locator("#bulk-summary")).to_contain_text("takes no new task")
        page.click("#bulk-confirm")
        expect(page.locator("#draining")).to_contain_text("Draining since", timeout=10000)
        assert db_query(args.database_url, "SELECT draining_since IS NOT NULL FROM workers WHERE id = 'ui-worker'") == "t"
        held = api.submit("while drained")
        time.sleep(3)
        assert api.status(held) == "queued", api.status(held)
        page.screenshot(path=str(shots / "worker-draining.png"), full_page=True)
        page.click("#worker-resume")
        expect(page.locator("#worker-drain")).to_be_visible()
        wait("the held task to complete after the resume", lambda: api.status(held) == "completed", lambda: api.status(held), 20)
        assert db_query(args.database_url, "SELECT count(*) FROM audit_logs WHERE action IN ('worker_draining', 'worker_resumed')") == "2"

        # Keyboard: the skip link comes first, the sections are reachable by Tab and Enter.
        page.goto("about:blank")  # a fresh load: the focus starts at the document
        page.goto(args.base + "/ui#/workers")
        expect(page.locator("h1")).to_have_text("Workers")
        page.keyboard.press("Tab")
        expect(page.locator(".skip")).to_be_focused()
        page.keyboard.press("Tab")  # Overview
        page.keyboard.press("Tab")  # Tasks
        page.keyboard.press("Enter")
        expect(page.locator("h1")).to_have_text("Tasks")
        browser.close()

    # Chromium logs each refused call; those before the key was given are expected (the
    # 401s the page answers by asking for the key), any other console error is not.
    expected = refused.count(False)
    for text in console_errors:
        if expected and "401" in text:
            expected -= 1
        else:
            problems.append(f"console: {text}")
    if True in refused:
        problems.append("a call was refused after signing in")
    if problems:
        sys.exit("dashboard problems:\n" + "\n".join(problems))
    print(f"dashboard check passed; screenshots in {shots}")


if __name__ == "__main__":
    main()
