"The docs site: an API page for every public name of `fsmtl.all`, and the browser check that catches broken links and images."
import sys
from pathlib import Path

import pytest

import fsmtl.all

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
from docs import api_markdown, api_modules, home_markdown, nav, pages  # noqa: E402
from docs_check import broken, check_site, missing_browser, serve  # noqa: E402


def test_api_pages_cover_fsmtl_all():
    names = [n for ns in api_modules().values() for n in ns]
    assert sorted(names) == sorted(fsmtl.all.__all__) and len(names) == len(set(names))


def test_api_page_shows_methods():
    md = api_markdown('classifier', ['FewShotClassifier'])
    for m in ('fit', 'predict', 'save', 'load', 'from_learner'): assert f'### FewShotClassifier.{m}\n' in md
    assert '.after_epoch\n' not in api_markdown('callbacks', api_modules()['callbacks'])   # fastai's events, not API


def test_api_page_shows_signature_and_docments():
    md = api_markdown('probe', api_modules()['probe'])
    assert md.startswith('# fsmtl.probe\n')
    for n in api_modules()['probe']: assert f'### {n}\n' in md
    assert 'def get_probe(' in md and '# ' in md.split('def get_probe(')[1].split(')')[0]


def test_every_page_is_in_the_navigation():
    ps = pages()
    assert [p[0] for p in ps[:8]] == ['index.html'] + [f'{p.stem}.html' for p in sorted((ROOT / 'nbs').glob('*.ipynb'))]
    bar = nav(ps)
    assert all(f'href="{p[0]}"' in bar for p in ps)


def test_home_page_links_the_tutorials():
    md = home_markdown((ROOT / 'README.md').read_text())
    for p in sorted((ROOT / 'nbs').glob('*.ipynb')): assert f'[`{p.name}`]({p.stem}.html)' in md


def _site(folder):
    "A two-page site: a good page, and a page with a broken link, a missing anchor and a missing picture."
    import matplotlib.pyplot as plt
    plt.figure(figsize=(2, 1)); plt.plot([0, 1]); plt.savefig(folder / 'plot.png'); plt.close()
    (folder / 'index.html').write_text('<h1 id="top">Home</h1><img src="plot.png"><a href="other.html#part">other</a>')
    (folder / 'other.html').write_text('<h2 id="part">Part</h2><img src="plot.png"><img src="gone.png">'
                                       '<a href="missing.html">x</a><a href="index.html#nowhere">y</a><a href="#part">z</a>')
    return folder


def test_broken_links_found_over_http(tmp_path):
    httpd = serve(_site(tmp_path))
    base, cache = f"http://127.0.0.1:{httpd.server_address[1]}/", {}
    try:
        assert not broken(base + 'other.html#part', cache) and not broken(base + 'index.html#top', cache)
        assert broken(base + 'missing.html', cache) and broken(base + 'index.html#nowhere', cache)
    finally: httpd.shutdown()


@pytest.mark.slow
@pytest.mark.skipif(bool(missing_browser()), reason=f"{missing_browser()}")
def test_browser_check_catches_broken_links_and_images(tmp_path):
    site = _site(tmp_path)
    problems = check_site(site, {'index.html': 1, 'other.html': 3})
    assert all('/other.html: ' in p for p in problems) and (site / 'screenshots' / 'index.png').exists()
    assert any('image did not load' in p and p.endswith('/gone.png') for p in problems)
    assert any(p.endswith('/missing.html') for p in problems) and any(p.endswith('index.html#nowhere') for p in problems)
    assert any('2 images, expected at least 3' in p for p in problems) and len(problems) == 4
    assert (site / 'screenshots' / 'other.png').stat().st_size > 1000
    (site / 'other.html').unlink()
    left = check_site(site, {'index.html': 1})
    assert len(left) == 1 and left[0].endswith('/other.html#part')   # the home page's link now leads nowhere
    (site / 'index.html').write_text('<h1 id="top">Home</h1><img src="plot.png"><a href="#top">top</a>')
    assert check_site(site, {'index.html': 1}) == []
