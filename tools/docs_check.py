"""Open every page of the built docs site in headless Chromium, served on 127.0.0.1: each must load every image and link
only to pages and anchors that exist. The home page, a tutorial with plots and an API page must show their pictures,
and a screenshot of each goes to `_docs/screenshots/`. Needs Debian's `chromium` and `chromium-driver` (apt-get install chromium chromium-driver):
without them it says so and exits 0.
Usage: python tools/docs_check.py [--site _docs]
"""
import argparse, re, shutil, sys, threading, time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urldefrag, urlparse
from urllib.request import urlopen

ROOT = Path(__file__).resolve().parents[1]
# the pages photographed, and the least number of pictures each must show
PAGES = {'index.html': 0, '00_quickstart.html': 2, 'fsmtl.learner.html': 0}
BROWSER, DRIVER = 'chromium', 'chromedriver'


def missing_browser():
    "What is missing to run the check, or None."
    gone = [n for n in (BROWSER, DRIVER) if not shutil.which(n)]
    return f"{' and '.join(gone)} not found: apt-get install chromium chromium-driver" if gone else None


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


def serve(site):   # the folder to serve
    "A `ThreadingHTTPServer` on 127.0.0.1 and a free port serving `site`, in a daemon thread."
    httpd = ThreadingHTTPServer(('127.0.0.1', 0), partial(_Quiet, directory=str(site)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def browser(width=1280):   # the window's width in pixels
    "Headless Chromium driven by chromedriver."
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which(BROWSER)
    for a in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', f'--window-size={width},900'):
        opts.add_argument(a)
    return webdriver.Chrome(options=opts, service=Service(shutil.which(DRIVER)))


_IMAGES = "return Array.from(document.images).map(i => [i.src, i.complete && i.naturalWidth > 0])"
_LINKS = "return Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"


def _page(url, cache):
    "The HTML at `url`, or None where it is not served; kept in `cache`."
    if url not in cache:
        try: cache[url] = urlopen(url, timeout=10).read().decode('utf-8', 'replace')
        except OSError: cache[url] = None
    return cache[url]


def broken(link, cache):   # an absolute link; `cache` keeps the pages read
    "Whether `link` leads to no page, or to a page without its `#anchor`."
    target, frag = urldefrag(link)
    html = _page(target, cache)
    return html is None or bool(frag) and re.search(rf'''id=["']{re.escape(frag)}["']''', html) is None


def check_page(driver,    # a `browser()`
               url,       # the page's address
               shot=None, # where its screenshot goes (PNG), if anywhere
               images=0): # the least number of images it must show
    "Problems of the page at `url`: images that did not load, internal links to no page or anchor; screenshot to `shot`."
    driver.set_window_size(driver.get_window_size()['width'], 900)
    driver.get(url)
    problems = [f"{url}: image did not load: {src}" for src, ok in driver.execute_script(_IMAGES) if not ok]
    n = len(driver.execute_script(_IMAGES))
    if n < images: problems.append(f"{url}: {n} images, expected at least {images}")
    host, pages = urlparse(url).netloc, {}
    links = [l for l in sorted(set(driver.execute_script(_LINKS))) if urlparse(l).netloc == host]
    problems += [f"{url}: broken link {l}" for l in links if broken(l, pages)]
    if shot: _screenshot(driver, shot)
    return problems


def _screenshot(driver, path):   # the PNG to write
    "A screenshot of the whole page, as tall as its content."
    h = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(driver.get_window_size()['width'], min(h, 20000))
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))


def check_site(site,        # the built site's folder
               shots=None): # page -> least images, for the pages photographed; default `PAGES`
    "Every problem found on the pages of the site in `site`; screenshots of `shots` under `site/screenshots/`."
    shots = PAGES if shots is None else shots
    httpd, driver = serve(site), browser()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}/"
        return [p for page in sorted(set(shots) | {f.name for f in site.glob('*.html')})
                for p in check_page(driver, base + page, site / 'screenshots' / f'{Path(page).stem}.png'
                                    if page in shots else None, shots.get(page, 0))]
    finally:
        driver.quit()
        httpd.shutdown()


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--site', type=Path, default=ROOT / '_docs')   # the built site (make docs)
    site = p.parse_args().site.resolve()
    if why := missing_browser(): sys.exit(print(f"docs check skipped: {why}"))
    if not (site / 'index.html').exists(): sys.exit(f"no site in {site}: run make docs first")
    start = time.time()
    problems = check_site(site)
    for pr in problems: print(pr)
    print(f"{len(list(site.glob('*.html')))} pages checked in {time.time() - start:.1f} s, {len(problems)} problems; "
          f"screenshots of {len(PAGES)} in {site / 'screenshots'}")
    sys.exit(1 if problems else 0)
