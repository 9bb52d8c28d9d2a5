"""The explain report: one self-contained HTML file, checked as text and in a real headless browser (Debian's
chromium-headless-shell or chromium, driven over the DevTools protocol on a pipe): the page is not blank, the verdict
table is visible at the top, there are no console errors, and no request leaves the file."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from sinkscope import api

from test_explain import PROMPTS, planted_model

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")
VIEWPORT = (1280, 900)


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    for path in ("/usr/lib/chromium/headless_shell", "/usr/lib/chromium/chromium"):
        if os.access(path, os.X_OK):
            return path
    return None


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """A single-model report (the planted sink: every step has numbers and plots) and a two-model comparison."""
    out = tmp_path_factory.mktemp("reports")
    lm = planted_model()
    ps = api.prompts(PROMPTS, bos="always")
    one = api.explain(lm, ps, n_controls=2, progress=False, batch_size=4)
    one.save(out / "one")
    two = api.explain(planted_model(seed=1), ps, n_controls=2, progress=False, batch_size=4)
    api.explain_compare([one, two]).save(out / "two")
    return {"one": out / "one" / "explain", "two": out / "two" / "explain", "result": one}


# -- the file itself --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["one", "two"])
def test_html_is_self_contained(reports, which):
    folder = reports[which]
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert {p.name for p in folder.iterdir()} == {"report.html", "report.json", "report.md"}
    assert "default-src 'none'; img-src data:; style-src 'unsafe-inline'" in page
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page, flags=re.I)
    assert refs, "no src/href at all"
    for ref in refs:
        assert ref.startswith("data:image/png;base64,") or ref in ("report.json", "report.md"), ref[:80]
    assert not re.search(r"https?://", page.replace("http-equiv", "")), "an http(s) URL in the report"
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) >= (5 if which == "one" else 10)
    for b64 in imgs:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    # the verdict comes first: before any step section
    assert page.index('id="verdict"') < page.index(">Where<")
    if which == "two":
        assert page.index('id="comparison"') < page.index('id="verdict"')


def test_report_json_and_md_hold_the_numbers(reports):
    data = json.loads((reports["one"] / "report.json").read_text())
    r = reports["result"]
    assert data["birth_layers"] == r.birth_layers == [1] and data["verdict"] == "found"
    assert data["token0"]["is_bos"] is True and isinstance(data["token0"]["text"], str)
    assert [c["id"] for c in data["claims"]] == ["where", "who", "what", "A_causal", "B_geometric"]
    for c in data["claims"]:
        assert set(c) == {"id", "text", "holds", "numbers", "thresholds"}
    assert data["thresholds"]["epsilon"] == 0.3 and data["summary"] == r.summary
    joint = next(x for x in data["steps"]["A_causal"]["runs"] if x["kind"] == "joint")
    assert joint["value"] == pytest.approx(r.claim("A_causal").numbers["ablated"])
    meta = data["meta"]
    for key in ("model", "prompts", "seed", "versions", "command"):
        assert key in meta
    for key in ("name", "source", "fingerprint", "revision", "dtype", "attn_implementation"):
        assert key in meta["model"]
    assert meta["prompts"]["sha256"] and meta["versions"]["torch"] and meta["versions"]["transformers"]
    md = (reports["one"] / "report.md").read_text()
    assert md.startswith("# sinkscope explain") and "**Verdict: found**" in md
    assert "| where | ✓ |" in md and f"{joint['value']:.3f}" in md


# -- a real browser ----------------------------------------------------------------------------------------------------

class Chrome:
    """A headless Chromium driven over --remote-debugging-pipe (fd 3: commands in, fd 4: replies out)."""

    def __init__(self, binary: str, profile: Path, log: Path):
        self.cmd_r, self.cmd_w = os.pipe()
        self.res_r, self.res_w = os.pipe()
        cmd_r, res_w = self.cmd_r, self.res_w

        def fds():
            os.dup2(cmd_r, 3)
            os.dup2(res_w, 4)
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                "--disable-default-apps", "--mute-audio", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                "--enable-logging=stderr", "--v=0", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "about:blank"]
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                     preexec_fn=fds, pass_fds=(3, 4))
        os.close(self.cmd_r)
        os.close(self.res_w)
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _read(self, timeout: float) -> dict | None:
        end = time.time() + timeout
        while b"\0" not in self.buf:
            left = end - time.time()
            if left <= 0:
                return None
            r, _, _ = select.select([self.res_r], [], [], left)
            if r:
                chunk = os.read(self.res_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("the browser closed the pipe")
                self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        end = time.time() + timeout
        while time.time() < end:
            m = self._read(end - time.time())
            if m is None:
                break
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)
        raise TimeoutError(method)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        for m in self.events:
            if m.get("method") == method:
                return m
        end = time.time() + timeout
        while time.time() < end:
            m = self._read(end - time.time())
            if m is None:
                break
            self.events.append(m)
            if m.get("method") == method:
                return m
        raise TimeoutError(method)

    def drain(self, seconds: float) -> None:
        end = time.time() + seconds
        while time.time() < end:
            m = self._read(end - time.time())
            if m is not None:
                self.events.append(m)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.cmd_w, self.res_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self.log.close()


def render_in_browser(binary: str, page: Path, workdir: Path) -> dict:
    """Open `page` in a fresh profile; return the events, a screenshot (PNG bytes) and the verdict table's layout."""
    chrome = Chrome(binary, workdir / "profile", workdir / "chrome.log")
    try:
        target = chrome.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = chrome.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            chrome.send(f"{domain}.enable", session=sid)
        chrome.send("Emulation.setDeviceMetricsOverride", {"width": VIEWPORT[0], "height": VIEWPORT[1],
                                                           "deviceScaleFactor": 1, "mobile": False}, session=sid)
        chrome.send("Page.navigate", {"url": page.resolve().as_uri()}, session=sid)
        chrome.wait_for("Page.loadEventFired")
        chrome.drain(1.0)                     # late console messages or requests, if any
        layout = chrome.send("Runtime.evaluate", {"returnByValue": True, "expression": """(() => {
            const t = document.querySelector('table.claims'), v = document.getElementById('verdict');
            const r = t ? t.getBoundingClientRect() : null, s = t ? getComputedStyle(t) : null;
            const imgs = [...document.images].map(i => [i.naturalWidth, i.complete]);
            return {table: r && {top: r.top, height: r.height, width: r.width, rows: t.rows.length,
                                  display: s.display, visibility: s.visibility, text: t.innerText},
                    verdict: v ? v.innerText : null, bodyText: document.body.innerText.length, imgs: imgs};
        })()"""}, session=sid)["result"]["value"]
        shot = base64.b64decode(chrome.send("Page.captureScreenshot", {"format": "png"}, session=sid)["data"])
        return {"events": chrome.events, "layout": layout, "shot": shot}
    finally:
        chrome.close()


def problems(events: list[dict], page_url: str) -> list[str]:
    """Console errors, exceptions, CSP violations and any request other than the page itself or a data: URL."""
    out = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
            out.append(f"console {p['type']}: {p.get('args')}")
        elif m == "Runtime.exceptionThrown":
            out.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
            out.append(f"log {p['entry']['level']}: {p['entry'].get('text')}")
        elif m == "Network.requestWillBeSent":
            url = p.get("request", {}).get("url", "")
            if url != page_url and not url.startswith("data:"):
                out.append(f"request: {url}")
        elif m == "Network.loadingFailed" and not p.get("canceled"):
            out.append(f"load failed: {p.get('errorText')}")
    return out


@pytest.fixture(scope="module")
def browser():
    binary = find_browser()
    if binary is None:
        pytest.skip("no headless Chromium found (looked for " + ", ".join(BROWSERS) + "); install Debian's "
                    "chromium-headless-shell (.ci/run does) to run the browser test")
    return binary


@pytest.mark.parametrize("which", ["one", "two"])
def test_report_renders_in_a_real_browser(browser, reports, which, tmp_path):
    page = reports[which] / "report.html"
    got = render_in_browser(browser, page, tmp_path)
    bad = problems(got["events"], page.resolve().as_uri())
    assert not bad, bad
    lay = got["layout"]
    t = lay["table"]
    assert t is not None, "no verdict table in the DOM"
    assert t["display"] != "none" and t["visibility"] == "visible" and t["height"] > 50 and t["width"] > 300
    assert t["rows"] == 6 and "A_causal" in t["text"] and "✓" in t["text"]
    if which == "one":
        assert 0 <= t["top"] < VIEWPORT[1], t             # the verdict table is on the first screen
        assert lay["verdict"].startswith("Verdict: found")
    assert lay["bodyText"] > 2000
    assert lay["imgs"] and all(w > 0 and done for w, done in lay["imgs"]), lay["imgs"]   # every plot decoded
    # the screenshot: a real page, not a blank one
    from matplotlib.image import imread
    (tmp_path / "shot.png").write_bytes(got["shot"])
    px = imread(io.BytesIO(got["shot"]), format="png")
    assert px.shape[0] == VIEWPORT[1] and px.shape[1] == VIEWPORT[0]
    rgb = px[..., :3]
    assert float(rgb.std()) > 0.05, "the screenshot is (almost) uniform"
    white = (rgb > 0.97).all(-1).mean()
    assert 0.2 < white < 0.995, white
    green = ((rgb[..., 1] > 0.4) & (rgb[..., 0] < 0.25) & (rgb[..., 2] < 0.35)).mean()
    if which == "one":
        assert green > 0.005, "the green 'found' verdict banner is not on screen"


def test_browser_check_catches_a_request_and_a_console_error(browser, reports, tmp_path):
    """The harness itself: a copy of the report with a remote image and an inline script must be flagged."""
    bad = tmp_path / "bad.html"
    page = (reports["one"] / "report.html").read_text(encoding="utf-8")
    bad.write_text(page.replace("</body>", '<img src="http://192.0.2.1/x.png"><script>console.error("x")</script>'
                                           "</body>"), encoding="utf-8")
    got = render_in_browser(browser, bad, tmp_path)
    found = problems(got["events"], bad.resolve().as_uri())
    assert any("192.0.2.1" in p or "Content Security Policy" in p for p in found), found
