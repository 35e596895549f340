#!/usr/bin/env python3
"""Open every page of the built book in headless Chromium and fail on what a reader would see broken.

    python tests/browser_check.py _build/html [--screenshots _build/screenshots]

(``make browser``, part of ``make test``, builds the book first and runs this.)  The site is served
by a local HTTP server on 127.0.0.1; Debian's ``chromium`` is driven over the Chrome DevTools
Protocol on a pipe (``--remote-debugging-pipe``), so there is no dependency beyond the standard
library and no debugging port to race for.  Chromium resolves no host but 127.0.0.1, so the check
is the same with or without a network, and an asset that the book would fetch from the internet
fails it.

A page fails if

* MathJax reports an error (``mjx-merror``), did not load, or left a math element untypeset, or
  raw TeX (the delimiters ``$$``, ``\\begin{``, ``\\(``, ``\\[``, or a command such as ``\\log``)
  remains in the rendered text outside code;
* an image did not load (``naturalWidth == 0``) or any request of the page failed (HTTP >= 400 or a
  network error);
* an internal link or resource does not resolve (HTTP status), or its ``#anchor`` is on no element
  of the target page;
* the console shows a JavaScript error (an uncaught exception, ``console.error``, or an error the
  browser logs).

It also measures the layout of every page, at 1280 px and at 390 px (a phone), and prints a table
per page (``--layout-json`` stores it):

* display equations wider than the text column (``eq>col``), at each width;
* code cells whose lines are wider than the column, and source lines over 88 characters;
* stray outputs: a cell output that is only ``True``/``False``/``None`` or shows an object repr
  (``<torch._C.Generator object at 0x...>``);
* figures (images in cell outputs) without a caption, and alt text that is a file name or hash;
* unfilled f-string placeholders such as ``{len(others)}`` in the text a reader sees;
* raw TeX in the page title (the browser tab and the search index show it unrendered);
* the share of the page's height taken by visible code.

The kinds in ``ENFORCED`` fail the page, and so do the limits of ``layout_limits``: no display
wider than the column at 1280 px, no code line over 88 characters, at most ``NARROW_SHARE`` of the
book's displays wider than the column at 390 px.  The rest is reported.

A full-page screenshot of every page under ``book/`` (every chapter, the front page and the back
matter) is saved as ``<screenshots>/<page>.png``.
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import functools
import http.server
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic", "--no-default-browser-check",
    "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
    "--force-device-scale-factor=1", "--remote-debugging-pipe",
    # Nothing but the local server resolves: an asset from a CDN fails the check on any machine.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
WIDTH, HEIGHT = 1280, 900
TABS = 1  # pages in flight at once (--tabs); on two busy cores more did not help
RAW_TEX = ("$$", "\\begin{", "\\end{", "\\(", "\\[")

# Wait until the page is settled: MathJax has typeset (if the page loads it), every image has
# loaded or failed, fonts are ready.  Resolves to a problem string or "ok".
READY_JS = r"""
(async () => {
  const t0 = Date.now(), sleep = ms => new Promise(r => setTimeout(r, ms));
  if (document.querySelector('script[src*="mathjax"]')) {
    while (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) {
      if (Date.now() - t0 > 20000) return 'MathJax did not load';
      await sleep(25);
    }
    await MathJax.startup.promise;
  }
  const imgs = [...document.images];
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.race([sleep(15000), Promise.all(imgs.map(i => i.complete ? null :
    new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); })))]);
  await document.fonts.ready;
  return 'ok';
})()
"""

# What a reader sees, gathered from the settled page.
INSPECT_JS = r"""
(() => {
  const skip = 'pre, code, script, style, textarea, mjx-container, .highlight, kbd, samp';
  // Text a reader sees: not code, not math already typeset, not hidden (the theme's print-only header).
  const shown = e => !e.closest(skip) && (!e.checkVisibility || e.checkVisibility());
  const walker = document.createTreeWalker(document.body || document.documentElement, NodeFilter.SHOW_TEXT,
    {acceptNode: n => n.parentElement && shown(n.parentElement) ? NodeFilter.FILTER_ACCEPT : NodeFilter.FILTER_REJECT});
  const rawtex = [];
  for (let n; (n = walker.nextNode());) {
    if (RAW.some(d => n.nodeValue.includes(d)) || /\\[A-Za-z]{2,}/.test(n.nodeValue))
      rawtex.push(n.nodeValue.trim().slice(0, 100));
  }
  const math = [...document.querySelectorAll('span.math, div.math')];
  return {
    merror: [...document.querySelectorAll('mjx-merror')].map(e => e.getAttribute('data-mjx-error') || e.textContent).slice(0, 10),
    untypeset: math.filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 80)).slice(0, 10),
    typeset: document.querySelectorAll('mjx-container').length,
    rawtex: rawtex.slice(0, 10),
    broken_images: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => (i.currentSrc || i.src).slice(0, 120)),
    images: document.images.length,
    links: [...new Set([...document.querySelectorAll('a[href]')].map(a => a.href))],
    resources: [...new Set([...document.querySelectorAll('link[href], script[src], img[src]')].map(e => e.href || e.src))],
    ids: [...document.querySelectorAll('[id]')].map(e => e.id).concat([...document.querySelectorAll('a[name]')].map(a => a.name)),
  };
})()
""".replace("RAW", json.dumps(RAW_TEX))


# Layout measurements (see the module docstring); one call per viewport width.
LAYOUT_JS = r"""
(async () => {
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const visible = e => !e.checkVisibility || e.checkVisibility();
  const article = document.querySelector('.bd-article') || document.querySelector('main') || document.body;
  const name = e => { const m = e.closest('[id]'); return m ? m.id : '?'; };
  // Display equations: the typeset math against the width of the block it sits in (the column).
  const displays = [...article.querySelectorAll('mjx-container[display="true"]')].filter(visible);
  const wideEq = displays.filter(c => {
    const inner = c.querySelector('mjx-math') || c;
    const col = (c.closest('div.math') || c.parentElement);
    return inner.getBoundingClientRect().width > col.clientWidth + 1;
  }).map(c => name(c));
  // Code cells: a <pre> that must scroll sideways.
  const pres = [...article.querySelectorAll('div.cell_input pre')];
  const widePre = pres.filter(p => visible(p) && p.scrollWidth > p.clientWidth + 1).length;
  const longLines = pres.map(p => p.textContent.split('\n').filter(l => l.length > 88).length)
                        .reduce((a, b) => a + b, 0);
  // Stray outputs: a text output that is only booleans/None, or an object repr anywhere.
  const outs = [...article.querySelectorAll('div.cell_output div.output pre')];
  const stray = outs.map(p => p.textContent.trim()).filter(t =>
    /^((True|False|None)\s*)+$/.test(t) || /<[\w.]+( object)? at 0x[0-9a-fA-F]+>/.test(t))
    .map(t => t.slice(0, 60));
  // Figures: images in cell outputs (and figure directives); a caption and an alt text that says something.
  const imgs = [...article.querySelectorAll('div.cell_output img, figure img')];
  const src = i => (i.getAttribute('src') || '').split('/').pop().slice(0, 40);
  const uncaptioned = imgs.filter(i => { const f = i.closest('figure'); return !(f && f.querySelector('figcaption')); }).map(src);
  const badAlt = imgs.filter(i => !i.alt || /\.(png|svg|jpe?g)$|[0-9a-f]{16}/.test(i.alt)).map(src);
  // Unfilled placeholders in the text a reader sees (not code, not math).
  const skip = 'pre, code, script, style, mjx-container, .highlight, .math';
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT,
    {acceptNode: n => n.parentElement && !n.parentElement.closest(skip) ? NodeFilter.FILTER_ACCEPT : NodeFilter.FILTER_REJECT});
  const placeholders = [];
  // A field is a Python expression in braces, not a TeX group: not after ^ or _ (2^{d}), and no
  // two words side by side ({z_i - max z} is mathematics written in plain text).
  for (let n; (n = walker.nextNode());) {
    for (const m of n.nodeValue.matchAll(/(^|[^^_\\\w])\{([A-Za-z_][\w.()\[\]'", +*\/:-]*)\}/g)) {
      if (!/[\w)\]]\s+[A-Za-z_(]/.test(m[2])) placeholders.push('{' + m[2] + '}');
    }
  }
  // Visible code's share of the page height.
  const codeHeight = [...article.querySelectorAll('div.cell_input')].filter(visible)
    .reduce((a, c) => a + c.getBoundingClientRect().height, 0);
  const title = document.title;
  return {
    displays: displays.length, wide_eq: wideEq,
    code_cells: pres.length, wide_code: widePre, long_lines: longLines,
    stray: stray, figures: imgs.length, uncaptioned: uncaptioned, bad_alt: badAlt,
    placeholders: placeholders,
    title_tex: /\\[A-Za-z(\[]|\$/.test(title) ? [title.slice(0, 80)] : [],
    code_share: article.scrollHeight ? codeHeight / article.scrollHeight : 0,
  };
})()
"""
NARROW = 390  # a phone's CSS width

# Layout faults that fail a page (fixed in the book; they must not come back).  The rest of the
# measurements are reported only.
ENFORCED = {
    "stray": "stray output",
    "placeholders": "unfilled placeholder",
    "title_tex": "raw TeX in the page title",
    "uncaptioned": "figure without a caption",
    "bad_alt": "image whose alt text is a file name",
}


class DevTools:
    """A minimal Chrome DevTools Protocol client over Chromium's --remote-debugging-pipe (fds 3, 4)."""

    def __init__(self, executable: str, profile: str, log):
        # Chromium reads commands from fd 3 and writes replies to fd 4.  A tiny Python trampoline
        # moves its ends of the two pipes there (kept above 9 first, so neither dup2 clobbers the
        # other) and execs Chromium.
        def high(fd):
            new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
            os.close(fd)
            return new

        cmd_r, self.cmd_w = map(high, os.pipe())
        self.res_r, res_w = map(high, os.pipe())
        argv = [executable, *FLAGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", "about:blank"]
        trampoline = (f"import os, sys; os.dup2({cmd_r}, 3); os.dup2({res_w}, 4); os.close({cmd_r}); "
                      f"os.close({res_w}); os.execv(sys.argv[1], sys.argv[1:])")
        self.proc = subprocess.Popen([sys.executable, "-c", trampoline, *argv], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, pass_fds=(cmd_r, res_w))
        os.close(cmd_r)
        os.close(res_w)
        self.buf, self.next_id, self.events = b"", 0, []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from Chromium")
            if select.select([self.res_r], [], [], left)[0]:
                chunk = os.read(self.res_r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the DevTools pipe (exit code {self.proc.poll()})")
                self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self.cmd_w, data):]
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, session: str, timeout: float = 30, count: int = 1) -> dict:
        """The ``count``-th event ``method`` of ``session`` since ``events`` was last cleared."""
        deadline = time.monotonic() + timeout
        while True:
            found = [ev for ev in self.events if ev["method"] == method and ev.get("sessionId") == session]
            if len(found) >= count:
                return found[count - 1]
            self.events.append(self._read(deadline))

    def evaluate(self, session: str, expression: str, timeout: float = 60):
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, session, timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.cmd_w)
        os.close(self.res_r)


def _implicit(url: str) -> bool:
    # Chromium probes /favicon.ico by itself on a page that declares no icon (the root redirect
    # page); that request is the browser's, not the book's.
    return urllib.parse.urlsplit(url).path == "/favicon.ico"


def console_problems(events: list, session: str) -> list:
    """JavaScript errors and failed requests among a page's DevTools events."""
    problems, urls = [], {}
    for ev in events:
        if ev.get("sessionId") != session:
            continue
        method, p = ev["method"], ev.get("params", {})
        if _implicit(p.get("entry", {}).get("url", "") or p.get("response", {}).get("url", "")
                     or urls.get(p.get("requestId"), "")):
            continue
        if method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            problems.append(f"JS exception: {(d.get('exception') or {}).get('description') or d.get('text')}")
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            problems.append(f"console.{p['type']}: {text[:300]}")
        elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
            e = p["entry"]
            problems.append(f"browser log: {e.get('text')} {e.get('url', '')}".strip())
        elif method == "Network.requestWillBeSent":
            urls[p["requestId"]] = p["request"]["url"]
        elif method == "Network.responseReceived" and p["response"]["status"] >= 400:
            problems.append(f"HTTP {p['response']['status']}: {p['response']['url']}")
        elif method == "Network.loadingFailed" and not p.get("canceled"):
            problems.append(f"request failed ({p.get('errorText')}): {urls.get(p['requestId'], '?')}")
    return list(dict.fromkeys(problems))


def serve(root: Path):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def screenshot(dt: DevTools, session: str, path: Path, width: int = WIDTH):
    """The whole page, not just the viewport: resize the viewport to the content, then capture."""
    size = dt.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
    height = min(int(size["height"]) + 1, 60000)
    dt.send("Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < WIDTH}, session)
    try:
        shot = dt.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False,
                                                 "optimizeForSpeed": True}, session, 120)
    finally:
        dt.send("Emulation.setDeviceMetricsOverride",
                {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session)
    path.write_bytes(base64.b64decode(shot["data"]))


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("browser check: no chromium on PATH (Debian: apt-get install --no-install-recommends chromium)")


def measure_layout(dt: DevTools, session: str, page: str, shots: Path | None) -> dict:
    """LAYOUT_JS at WIDTH and at NARROW; a narrow screenshot of each chapter as ``<page>-390.png``."""
    wide = dt.evaluate(session, LAYOUT_JS)
    dt.send("Emulation.setDeviceMetricsOverride",
            {"width": NARROW, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": True}, session)
    try:
        narrow = dt.evaluate(session, LAYOUT_JS)
        if shots is not None and Path(page).name.startswith("ch"):
            screenshot(dt, session, shots / f"{Path(page).stem}-{NARROW}.png", NARROW)
    finally:
        dt.send("Emulation.setDeviceMetricsOverride",
                {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session)
    wide["wide_eq_narrow"] = narrow["wide_eq"]
    wide["wide_code_narrow"] = narrow["wide_code"]
    return wide


# Searches a reader makes: an English word, and the Chinese terms the chapters quote (the default
# splitter kept a run of CJK characters as one word, so a single character found nothing).
SEARCHES = ("entropy", "熵", "归一化")
SEARCH_JS = r"""
(async () => {
  const t0 = Date.now(), sleep = ms => new Promise(r => setTimeout(r, ms));
  // The search page lists its hits one by one, then says it has finished.
  while (Date.now() - t0 < 30000) {
    const summary = document.querySelector('#search-results .search-summary');
    if (summary && /found|did not match/i.test(summary.textContent))
      return document.querySelectorAll('#search-results ul.search li').length;
    await sleep(100);
  }
  return 0;
})()
"""


def search_hits(dt: DevTools, session: str, base: str, query: str) -> int:
    """How many pages the site's own search page lists for ``query``."""
    dt.events = [ev for ev in dt.events if ev.get("sessionId") != session]
    dt.send("Page.navigate", {"url": base + "search.html?q=" + urllib.parse.quote(query)}, session)
    dt.wait_for("Page.loadEventFired", session)
    return int(dt.evaluate(session, SEARCH_JS) or 0)


def layout_problems(layout: dict) -> list:
    """The ENFORCED layout faults of one page, as problem strings."""
    return [f"{what}: {item!r}" for kind, what in ENFORCED.items() for item in layout[kind][:10]]


#: The share of the book's display equations that may be wider than the column on a phone (390 px):
#: a long chain that would be unreadable broken up stays on one line and scrolls.
NARROW_SHARE = 0.10


def layout_limits(layouts: dict) -> dict:
    """Limits on the measurements, as {page: [problem, ...]}: no display equation wider than the
    column at 1280 px and no code line over 88 characters on any page, and at most NARROW_SHARE of
    the book's displays wider than the column at 390 px (listed under "390 px")."""
    out: dict = {}
    for page, m in layouts.items():
        problems = [f"display wider than the column at {WIDTH} px: {e!r}" for e in m["wide_eq"][:10]]
        if m["long_lines"]:
            problems.append(f"{m['long_lines']} code line(s) over 88 characters")
        if problems:
            out[page] = problems
    narrow = sum(len(m["wide_eq_narrow"]) for m in layouts.values())
    shown = sum(m["displays"] for m in layouts.values())
    if shown and narrow > NARROW_SHARE * shown:
        out[f"{NARROW} px"] = [f"{narrow} of {shown} display equations are wider than the column at {NARROW} px "
                               f"(at most {NARROW_SHARE:.0%})"]
    return out


def layout_table(layouts: dict) -> str:
    """One line per page that has something to measure: the numbers of the module docstring."""
    head = (f"{'page':<36}{'eq>col':>8}{'@390':>6}{'/eqs':>6}{'code>col':>10}{'@390':>6}{'/cells':>7}"
            f"{'>88ch':>7}{'stray':>7}{'nocap':>7}{'/figs':>6}{'alt':>5}{'{..}':>6}{'titleTeX':>9}{'code%':>7}")
    lines = [head]
    total = dict.fromkeys(["wide_eq", "wide_eq_narrow", "displays", "wide_code", "wide_code_narrow",
                           "code_cells", "long_lines", "stray", "uncaptioned", "figures", "bad_alt",
                           "placeholders", "title_tex"], 0)
    n = lambda v: len(v) if isinstance(v, list) else v  # noqa: E731
    for page, m in sorted(layouts.items()):
        if not (m["displays"] or m["code_cells"] or m["figures"] or m["placeholders"] or m["title_tex"]):
            continue
        for k in total:
            total[k] += n(m[k])
        lines.append(f"{page.removeprefix('book/'):<36}{n(m['wide_eq']):>8}{n(m['wide_eq_narrow']):>6}"
                     f"{m['displays']:>6}{m['wide_code']:>10}{m['wide_code_narrow']:>6}{m['code_cells']:>7}"
                     f"{m['long_lines']:>7}{n(m['stray']):>7}{n(m['uncaptioned']):>7}{m['figures']:>6}"
                     f"{n(m['bad_alt']):>5}{n(m['placeholders']):>6}{n(m['title_tex']):>9}{m['code_share']:>7.0%}")
    t = total
    lines.append(f"{'total':<36}{t['wide_eq']:>8}{t['wide_eq_narrow']:>6}{t['displays']:>6}{t['wide_code']:>10}"
                 f"{t['wide_code_narrow']:>6}{t['code_cells']:>7}{t['long_lines']:>7}{t['stray']:>7}"
                 f"{t['uncaptioned']:>7}{t['figures']:>6}{t['bad_alt']:>5}{t['placeholders']:>6}{t['title_tex']:>9}")
    return "\n".join(lines)


def check_site(root: Path, pages: list, shots: Path | None, log_path: Path, verbose: bool = True,
               tabs: int = TABS, layouts: dict | None = None):
    """Open ``pages`` (paths under ``root``) one by one; return ``({page: [problem, ...]}, n_links)``.
    With ``shots``, save a full-page screenshot of each page under ``book/`` there.  With
    ``layouts`` (a dict), store each page's layout measurements in it."""
    server = serve(root)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    profile = tempfile.mkdtemp(prefix="browser-check-")
    log = open(log_path, "ab")
    failures: dict[str, list] = {}
    ids: dict[str, set] = {}
    links: dict[str, set] = {}  # internal url -> pages that link to it
    try:
        dt = DevTools(find_chromium(), profile, log)
        try:
            # ``tabs`` pages load at once (each tab is its own renderer process, so MathJax can
            # typeset them on separate cores); they are inspected and photographed one by one.
            sessions = []
            for _ in range(max(1, min(tabs, len(pages)))):
                target = dt.send("Target.createTarget", {"url": "about:blank", "newWindow": True})["targetId"]
                session = dt.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
                for domain in ("Page", "Runtime", "Log", "Network"):
                    dt.send(f"{domain}.enable", session=session)
                dt.send("Emulation.setDeviceMetricsOverride",
                        {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session)
                sessions.append(session)
            for start in range(0, len(pages), len(sessions)):
                batch = list(zip(pages[start:start + len(sessions)], sessions))
                t0, problems = time.monotonic(), {}
                for page, session in batch:
                    dt.events = [ev for ev in dt.events if ev.get("sessionId") != session]
                    nav = dt.send("Page.navigate", {"url": base + page}, session)
                    problems[page] = [f"navigation failed: {nav['errorText']}"] if nav.get("errorText") else []
                for page, session in batch:
                    # A redirect page (the site's root index.html) loads, then loads its target.
                    redirect = "http-equiv=\"refresh\"" in (root / page).read_text(errors="replace").lower()
                    dt.wait_for("Page.loadEventFired", session, count=2 if redirect else 1)
                    ready = dt.evaluate(session, READY_JS)
                    if ready != "ok":
                        problems[page].append(ready)
                for page, session in batch:
                    seen = dt.evaluate(session, INSPECT_JS)
                    found = problems[page]
                    found += [f"MathJax error: {m}" for m in seen["merror"]]
                    found += [f"math not typeset: {m!r}" for m in seen["untypeset"]]
                    found += [f"raw TeX in the text: {t!r}" for t in seen["rawtex"]]
                    found += [f"image did not load: {src}" for src in seen["broken_images"]]
                    if layouts is not None:
                        layouts[page] = measure_layout(dt, session, page, shots)
                        found += layout_problems(layouts[page])
                    ids[page] = set(seen["ids"])
                    for url in seen["links"] + seen["resources"]:
                        if url.startswith(base):
                            links.setdefault(url, set()).add(page)
                    shot = ""
                    if shots is not None and page.startswith("book/"):
                        path = shots / (Path(page).stem + ".png")
                        screenshot(dt, session, path)
                        shot = f", screenshot {os.path.relpath(path)}"
                    found += console_problems(dt.events, session)
                    if found:
                        failures[page] = found
                    if verbose:
                        print(f"{'FAIL' if found else 'ok  '}  {page}  ({time.monotonic() - t0:.1f} s, "
                              f"{seen['typeset']} formulas typeset, {seen['images']} images{shot})", flush=True)
            if layouts is not None and "search.html" in pages:
                for query in SEARCHES:
                    hits = search_hits(dt, sessions[0], base, query)
                    if verbose:
                        print(f"{'ok  ' if hits else 'FAIL'}  search for {query!r}: {hits} page(s)", flush=True)
                    if not hits:
                        failures.setdefault("search.html", []).append(f"search for {query!r} finds nothing")
        finally:
            dt.close()
        # Internal links: the file must be served, and an #anchor must be an id on that page.
        for url, sources in sorted(links.items()):
            parsed = urllib.parse.urlsplit(url)
            target = urllib.parse.unquote(parsed.path[1:])
            code = status_of(urllib.parse.urlunsplit(parsed._replace(fragment="")))
            problem = None
            if code >= 400:
                problem = f"internal link {url[len(base) - 1:]} -> HTTP {code}"
            elif parsed.fragment and target in ids and urllib.parse.unquote(parsed.fragment) not in ids[target]:
                problem = f"internal link {url[len(base) - 1:]}: no element with id {parsed.fragment!r} on {target}"
            if problem:
                for page in sorted(sources):
                    failures.setdefault(page, []).append(problem)
    finally:
        log.close()
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
    return failures, len(links)


# One of each fault the check must catch, planted in a copy of a page that loads MathJax.
PLANTED = {
    "MathJax error": '<span class="math notranslate nohighlight">\\(\\frac{1}\\)</span>',  # \frac lacks an argument
    "raw TeX in the text": '<div class="tex2jax_ignore mathjax_ignore"><p>left raw: $$x^2$$, \\log n</p></div>',
    "image did not load": '<img src="no-such-image.png" alt="planted">',
    "HTTP 404": '<a href="no-such-page.html">planted</a>',
    "no element with id": '<a href="#no-such-anchor">planted</a>',
    "JS exception": '<script>throw new Error("planted")</script>',
}
# Layout faults are measured in the page's article (the text column), so they are planted there.
PLANTED_IN_ARTICLE = {
    "stray output": '<div class="cell_output"><div class="output text_plain"><pre>True\n</pre></div></div>',
    "unfilled placeholder": '<p>checked on {len(others)} rows</p>',
    "figure without a caption": '<div class="cell_output"><img alt="d41d8cd98f00b204e9800998ecf8427e.png" src='
                                '"data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"></div>',
}


def self_test(root: Path, log_path: Path) -> list:
    """Plant each fault of PLANTED in a copy of the smallest page that loads MathJax (the rest of
    the site is linked, not copied) and return the faults the check did not report."""
    loads_mathjax = re.compile(r"<script[^>]*\ssrc=\"[^\"]*mathjax[^\"]*\"", re.I)
    candidates = sorted((p for p in root.rglob("*.html") if loads_mathjax.search(p.read_text(errors="replace"))
                         and not p.relative_to(root).parts[0].startswith("_")), key=lambda p: p.stat().st_size)
    if not candidates:
        return ["no page loads MathJax"]
    page = candidates[0].relative_to(root)
    tmp = Path(tempfile.mkdtemp(prefix="browser-selftest-"))
    try:
        for entry in root.iterdir():
            if entry.name != page.parts[0]:
                (tmp / entry.name).symlink_to(entry)
        if len(page.parts) > 1:
            (tmp / page.parts[0]).mkdir()
            for entry in (root / page.parts[0]).iterdir():
                if entry.name != page.name:
                    (tmp / page.parts[0] / entry.name).symlink_to(entry)
        html = (root / page).read_text()
        html = re.sub(r'(<[^>]*class="[^"]*\bbd-article\b[^"]*"[^>]*>)',
                      lambda m: m[1] + "".join(PLANTED_IN_ARTICLE.values()), html, count=1)
        (tmp / page).write_text(html.replace("</body>", "".join(PLANTED.values()) + "</body>", 1))
        failures, _ = check_site(tmp, [page.as_posix()], None, log_path, verbose=False, layouts={})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = "\n".join(failures.get(page.as_posix(), []))
    return [fault for fault in {**PLANTED, **PLANTED_IN_ARTICLE} if fault not in found]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", nargs="?", default="_build/html", type=Path)
    ap.add_argument("--screenshots", type=Path, default=None, help="default: <html>/../screenshots")
    ap.add_argument("--no-self-test", action="store_true", help="skip planting faults in a copy first")
    ap.add_argument("--tabs", type=int, default=TABS, help="pages loading at once (default %(default)s)")
    ap.add_argument("--layout-json", type=Path, default=None, help="store the layout measurements here")
    args = ap.parse_args(argv)
    root = args.html.resolve()
    shots = (args.screenshots or root.parent / "screenshots").resolve()
    if not (root / "index.html").is_file():
        sys.exit(f"browser check: {root}/index.html not found; build the book first (make book)")
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    log_path = shots / "chromium.log"
    t_start = time.monotonic()
    if not args.no_self_test:
        missed = self_test(root, log_path)
        if missed:
            print(f"browser check self-test: planted faults NOT detected: {missed}")
            print("browser: 0 passed, 1 failed")
            return 1
        print(f"browser check self-test: all {len(PLANTED) + len(PLANTED_IN_ARTICLE)} planted faults detected "
              f"({time.monotonic() - t_start:.1f} s)")
    pages = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.html")
                   if not p.relative_to(root).parts[0].startswith("_"))
    layouts: dict = {}
    failures, n_links = check_site(root, pages, shots, log_path, tabs=args.tabs, layouts=layouts)
    for page, problems in layout_limits(layouts).items():
        failures.setdefault(page, []).extend(problems)
    print("\nlayout (eq>col: display equations wider than the column at 1280 px, @390 at 390 px; "
          "code>col: code cells that scroll sideways; >88ch: source lines over 88 characters; "
          "nocap: figures without a caption; alt: alt text that is a file name)")
    print(layout_table(layouts))
    if args.layout_json:
        args.layout_json.write_text(json.dumps(layouts, indent=1, sort_keys=True))
    for page, problems in failures.items():
        print(f"\n{page}:")
        for p in problems:
            print(f"  - {p}")
    print(f"\nbrowser check: {len(pages)} pages, {n_links} internal links and resources, "
          f"{time.monotonic() - t_start:.1f} s; screenshots in {os.path.relpath(shots)}")
    print(f"browser: {len(pages) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
