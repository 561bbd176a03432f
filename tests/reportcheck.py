"""What the report tests read back from headless Chromium: a probe page loads the report in an iframe,
waits for every image, and writes what the rendered DOM holds (images and whether they decoded, every
link, the example cards, the tables the tests look at) as JSON, which `--dump-dom` returns."""
from __future__ import annotations

import html
import io
import json
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import numpy as np

TABLES = ("fingerprints", "failures-by-host", "download-reasons", "files")
TEXTS = ("threshold", "run-dates", "code-version", "config")

PROBE = """<!doctype html><body><pre id=out>waiting</pre><iframe id=f src='file://PAGE'></iframe><script>
document.getElementById('f').onload=function(){var d=this.contentDocument;var imgs=[...d.images];
var img=i=>({role:i.className,src:i.getAttribute('src'),width:i.naturalWidth});
Promise.all(imgs.map(i=>i.complete?0:new Promise(r=>{i.onload=i.onerror=r}))).then(()=>{
document.getElementById('out').textContent=JSON.stringify({
 images:imgs.map(img),
 hrefs:[...d.querySelectorAll('a[href]')].map(a=>a.getAttribute('href')),
 examples:[...d.querySelectorAll('.example')].map(e=>({data:{...e.dataset},text:e.textContent,
   images:[...e.querySelectorAll('img')].map(img)})),
 text:Object.fromEntries(TEXTS.map(id=>[id,d.getElementById(id)?d.getElementById(id).textContent:null])),
 tables:Object.fromEntries(TABLES.map(id=>[id,[...d.querySelectorAll('#'+id+' tr')].slice(1).map(
   r=>({data:{...r.dataset},cells:[...r.cells].map(c=>c.textContent)}))]))})})};
</script></body>"""


def render(page: Path, tmp: Path) -> dict:
    """The report at `page` as headless Chromium rendered it (see the module's docstring)."""
    probe = tmp / "probe.html"
    probe.write_text(PROBE.replace("PAGE", str(page)).replace("TEXTS", json.dumps(TEXTS))
                     .replace("TABLES", json.dumps(TABLES)))
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    assert os.path.exists(chromium), "the test set-up installs Debian's chromium (make test)"
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--allow-file-access-from-files", f"--user-data-dir={tmp / 'profile'}",
                           "--virtual-time-budget=10000", "--dump-dom", f"file://{probe}"],
                          capture_output=True, text=True, timeout=120)
    start = proc.stdout.index('<pre id="out">') + len('<pre id="out">')
    dom = json.loads(html.unescape(proc.stdout[start:proc.stdout.index("</pre>", start)]))
    broken = [i["src"] for i in dom["images"] if i["width"] == 0]
    assert not broken, f"images that did not load: {broken}"
    return dom


def linked_files(dom: dict, page: Path, run_dir: Path) -> set[str]:
    """Every link of the report, as a path relative to the run directory; each must be a relative link
    to a file inside the run directory that exists."""
    found = set()
    for href in dom["hrefs"]:
        assert "://" not in href and not href.startswith("/"), f"not a relative link: {href}"
        target = (page.parent / unquote(href)).resolve()
        assert target.is_relative_to(run_dir.resolve()), f"{href} leaves the run directory"
        assert target.is_file(), f"{href} names no file"
        found.add(target.relative_to(run_dir.resolve()).as_posix())
    return found


def pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L").resize((32, 32)), dtype=np.float32)


def difference(a: bytes, b: bytes) -> float:
    """Mean grey-level difference of two images at 32x32: a thumbnail and its original differ by ~1."""
    return float(np.abs(pixels(a) - pixels(b)).mean())
