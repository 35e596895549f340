#!/usr/bin/env python3
"""Print the built book to one PDF through headless Chromium: ``make pdf`` (after ``make book``).

    python tests/print_book.py _build/html _build/pdf/entmath.pdf

The pages of ``_toc.yml``, in its order, are read from the built site, and the article of each
(its text, equations, figures; no navigation) is put into one HTML page beside them, so that the
site's own CSS and MathJax render it exactly as on screen.  Links between pages become links
within the PDF.  Chromium opens that page over a local HTTP server (the same client as the
browser check, tests/browser_check.py), waits until MathJax has typeset every formula and every
figure has loaded, and prints it on A4 with page numbers.  The print style sheet of the book
(book/_ext/static/entmath_book.css, ``@media print``) keeps code and equations whole, and each
page of the site starts a new PDF page.

The script fails if a page of the table of contents is missing from the site, if MathJax reports
an error, or if the PDF has fewer pages than the site has pages.
"""
from __future__ import annotations

import argparse
import base64
import re
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bs4 import BeautifulSoup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser_check import READY_JS, DevTools, find_chromium, serve  # noqa: E402

# A4 less the margins below, in CSS pixels (96 per inch): the width the pages are laid out at.
PRINT_WIDTH = round((8.27 - 2 * 0.55) * 96)

# With the page laid out at the printed width: a display equation or a table wider than its column
# is scaled down to fit (CSS zoom), rather than cut at the paper's edge.
FIT_JS = r"""
(async () => {
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  let n = 0;
  // A centred display overflows on both sides, and scrollWidth misses the left: measure the math.
  const wide = [];
  for (const e of document.querySelectorAll('mjx-container[display="true"]')) {
    const col = e.closest('section.print-page').getBoundingClientRect();
    const r = (e.querySelector('mjx-math') || e).getBoundingClientRect();
    const number = e.closest('div.math')?.querySelector('.eqno');
    const avail = col.width - (number ? number.getBoundingClientRect().width + 8 : 0);
    if (r.left < col.left - 1 || r.right > col.right + 1 || r.width > avail + 1) wide.push([e, avail / r.width]);
  }
  for (const e of document.querySelectorAll('table')) {
    const avail = e.parentElement.clientWidth, need = e.scrollWidth;
    if (avail > 0 && need > avail + 1) wide.push([e, avail / need]);
  }
  for (const [e, f] of wide) { e.style.zoom = Math.max(0.4, f * 0.98).toFixed(3); n++; }
  return n;
})()
"""

# Sent as the page's footer: the page number and the count (Chromium fills the spans).
FOOTER = ('<div style="font-size:8px; width:100%; text-align:center; color:#555;">'
          '<span class="pageNumber"></span> / <span class="totalPages"></span></div>')


def toc_pages(toc: Path) -> list:
    """The documents of ``_toc.yml`` in reading order (root first), without suffix."""
    spec = yaml.safe_load(toc.read_text(encoding="utf-8"))
    pages = [spec["root"]]
    for part in spec.get("parts", []):
        pages += [entry["file"] for entry in part.get("chapters", [])]
    return pages


def compose(site: Path, pages: list) -> str:
    """One HTML document: the head of the first page, then every page's article, in order."""
    head, bodies = None, []
    local = {Path(p).name + ".html" for p in pages}
    for page in pages:
        path = site / f"{page}.html"
        if not path.exists():
            raise SystemExit(f"print: {path} is missing: build the book first (make book)")
        soup = BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
        if head is None:
            head = soup.head
        article = soup.select_one("article.bd-article") or soup.select_one("main")
        # Folded cells (set-up and check code) stay out of print, as they are folded on screen.
        for junk in article.select(".headerlink, details.hide, button"):
            junk.decompose()
        for a in article.select("a[href]"):  # a link to another page of the book: a link in the PDF
            target, _, frag = a["href"].partition("#")
            if target in local:
                a["href"] = "#" + (frag or f"page-{Path(target).stem}")
        bodies.append(f'<section class="print-page" id="page-{Path(page).name}">{article.decode_contents()}</section>')
    style = "<style>.print-page { break-before: page; } .print-page:first-child { break-before: auto; }</style>"
    return f"<!DOCTYPE html><html lang=\"en\">{head.decode()}{style}<body>{''.join(bodies)}</body></html>"


def pdf_pages(data: bytes) -> int:
    return len(re.findall(rb"/Type\s*/Page(?![s\w])", data))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", type=Path, nargs="?", default=Path("_build/html"))
    ap.add_argument("out", type=Path, nargs="?", default=Path("_build/pdf/entmath.pdf"))
    ap.add_argument("--toc", type=Path, default=Path("_toc.yml"))
    args = ap.parse_args(argv)
    pages = toc_pages(args.toc)
    # Beside the pages (all under book/), so that the relative links to _static/ resolve alike.
    combined = args.html / Path(pages[0]).parent / "_print_book.html"
    combined.write_text(compose(args.html, pages), encoding="utf-8")
    server = serve(args.html)
    profile = tempfile.mkdtemp(prefix="print-book-")
    t0 = time.monotonic()
    try:
        with open(Path(profile) / "chromium.log", "ab") as log:
            dt = DevTools(find_chromium(), profile, log)
            try:
                target = dt.send("Target.createTarget", {"url": "about:blank"})["targetId"]
                session = dt.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
                dt.send("Page.enable", session=session)
                dt.send("Runtime.enable", session=session)
                url = f"http://127.0.0.1:{server.server_address[1]}/{combined.relative_to(args.html).as_posix()}"
                dt.send("Page.navigate", {"url": url}, session)
                dt.wait_for("Page.loadEventFired", session, timeout=120)
                ready = dt.evaluate(session, READY_JS, timeout=600)
                if ready != "ok":
                    raise SystemExit(f"print: the page did not settle: {ready}")
                dt.send("Emulation.setEmulatedMedia", {"media": "print"}, session)
                dt.send("Emulation.setDeviceMetricsOverride",
                        {"width": PRINT_WIDTH, "height": 1100, "deviceScaleFactor": 1, "mobile": False}, session)
                fitted = dt.evaluate(session, FIT_JS, timeout=120)
                errors = dt.evaluate(session, "document.querySelectorAll('mjx-merror').length")
                if errors:
                    raise SystemExit(f"print: MathJax reported {errors} errors")
                result = dt.send("Page.printToPDF", {
                    "printBackground": True, "paperWidth": 8.27, "paperHeight": 11.69,
                    "marginTop": 0.6, "marginBottom": 0.6, "marginLeft": 0.55, "marginRight": 0.55,
                    "displayHeaderFooter": True, "headerTemplate": "<span></span>", "footerTemplate": FOOTER,
                }, session, timeout=600)
            finally:
                dt.close()
    finally:
        server.shutdown()
        combined.unlink(missing_ok=True)
    data = base64.b64decode(result["data"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    n = pdf_pages(data)
    print(f"print: {args.out} ({len(data) / 2**20:.1f} MiB, {n} pages, {len(pages)} pages of the site, "
          f"{fitted} wide displays or tables scaled to the column, {time.monotonic() - t0:.0f} s)")
    if n < len(pages):
        print("print: fewer PDF pages than pages of the site")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
