"""Build the docs site: a home page from README.md, the tutorials of `nbs/` with their committed outputs, and one API
reference page a module of `fsmtl.all`, made by nbdev's `show_doc`; pandoc (the `pypandoc-binary` package) renders them.
Usage: python tools/docs.py [--out _docs]
"""
import argparse, importlib, inspect, json, re, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
sys.path.insert(0, str(Path(__file__).parent))
from notebooks import stale  # noqa: E402


def pandoc():
    "The pandoc binary that `pypandoc-binary` ships."
    import pypandoc
    return pypandoc.get_pandoc_path()


def api_modules():
    "Each module of `fsmtl.all` with the public functions and classes it documents, in `fsmtl.all`'s order."
    import fsmtl.all
    mods = {m: [n for n in importlib.import_module(f'fsmtl.{m}').__all__ if n in fsmtl.all.__all__]
            for m in fsmtl.all.MODULES}
    return {m: ns for m, ns in mods.items() if ns}


def public_methods(cls):   # a class
    "The public methods `cls` defines itself, leaving out fastai's callback events (`after_epoch` ...)."
    from fastai.callback.core import _events
    return [m for m, f in vars(cls).items() if not m.startswith('_') and m not in _events
            and inspect.isfunction(getattr(f, '__func__', f))]


def documented(mod,     # a module
               names):  # names of its public functions and classes
    "The objects named `names` in `mod`, each class followed by its public methods."
    for n in names:
        o = getattr(mod, n)
        yield o
        if inspect.isclass(o): yield from (getattr(o, m) for m in public_methods(o))


def api_markdown(module,   # a module name of `fsmtl.all.MODULES`, e.g. 'data.core'
                 names):   # the names of its public functions and classes
    "The API page of `fsmtl.{module}`: its docstring, then `show_doc` of each name and of each class's methods."
    from nbdev.showdoc import show_doc
    mod = importlib.import_module(f'fsmtl.{module}')
    head = f"# fsmtl.{module}\n\n> {inspect.getdoc(mod) or ''}\n\n"
    return head + '\n\n'.join(show_doc(o)._repr_markdown_() for o in documented(mod, names))


def home_markdown(readme):   # the text of README.md
    "The home page: `readme`, with each tutorial it names (`00_quickstart.ipynb`) linked to its page."
    return re.sub(r'`(\d\d_\w+)\.ipynb`', r'[`\1.ipynb`](\1.html)', readme)


def notebook_title(path):
    "The `# title` of the notebook at `path`'s first cell."
    return json.loads(path.read_text())['cells'][0]['source'][0].lstrip('# ').strip()


def pages():
    "(file name, title, kind, source) of every page: the home page, the tutorials, the API reference."
    tutorials = [(f'{p.stem}.html', notebook_title(p), 'tutorial', p) for p in sorted(NBS.glob('*.ipynb'))]
    api = [(f'fsmtl.{m}.html', f'fsmtl.{m}', 'api', (m, ns)) for m, ns in api_modules().items()]
    return [('index.html', 'fsmtl', 'home', ROOT / 'README.md')] + tutorials + api


def nav(pages):   # every page, as `pages()` gives them
    "The site's navigation bar: home, the tutorials, the API pages."
    def links(kind): return ''.join(f'<li><a href="{f}">{t}</a></li>' for f, t, k, _ in pages if k == kind)
    return (f'<nav id="site"><a class="home" href="index.html">fsmtl</a>'
            f'<div><span>Tutorials</span><ul>{links("tutorial")}</ul></div>'
            f'<div><span>API reference</span><ul>{links("api")}</ul></div></nav>')


def renderable(nb):
    "A copy of the notebook dict `nb` that pandoc reads: `nbdev_clean` leaves results unnumbered, pandoc wants numbers."
    nb = json.loads(json.dumps(nb))
    for c in nb['cells']:
        for o in c.get('outputs', []):
            if o['output_type'] == 'execute_result': o.update(output_type='display_data', metadata=o.get('metadata', {}))
            o.pop('execution_count', None)
    return nb


def source(page,   # (file name, title, kind, source) from `pages()`
           tmp):   # the folder to write it into
    "The file pandoc reads for `page`, written into `tmp`, and its format."
    name, _, kind, src = page
    if kind == 'api': text, fmt = api_markdown(*src), 'gfm'
    elif kind == 'tutorial': text, fmt = json.dumps(renderable(json.loads(src.read_text()))), 'ipynb'
    else: text, fmt = home_markdown(src.read_text()), 'gfm'
    path = tmp / (Path(name).stem + ('.ipynb' if fmt == 'ipynb' else '.md'))
    path.write_text(text)
    return path, fmt


def render(out,      # the site's folder
           page,     # (file name, title, kind, source) from `pages()`
           nav_file, # the navigation bar's HTML file, put before each page's body
           tmp):     # a folder for the sources pandoc reads
    "Write `page` as HTML into `out`, its pictures in a folder beside it."
    src, fmt = source(page, tmp)
    subprocess.run([pandoc(), '-f', fmt, '-t', 'html5', '-s', '--toc', '--toc-depth=3', '--css', 'styles.css',
                    '--metadata', f'pagetitle={page[1]}', '--include-before-body', str(nav_file),
                    f'--resource-path={ROOT}', f'--extract-media={src.stem}_files', '-o', page[0], str(src)],
                   cwd=out, check=True)


def build(out=ROOT / '_docs'):   # the site's folder, made afresh
    "Build the site into `out`; refuses tutorials whose outputs are stale."
    bad = {p.name: why for p in NBS.glob('*.ipynb') if (why := stale(p))}
    if bad: raise SystemExit('stale notebooks, run python tools/notebooks.py run: ' + '; '.join(f'{n}: {w}' for n, w in bad.items()))
    shutil.rmtree(out, ignore_errors=True)
    tmp = out / '_src'
    tmp.mkdir(parents=True)
    ps = pages()
    (tmp / 'nav.html').write_text(nav(ps))
    shutil.copy(NBS / 'styles.css', out / 'styles.css')
    for p in ps: render(out, p, tmp / 'nav.html', tmp)
    shutil.rmtree(tmp)
    return ps


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', type=Path, default=ROOT / '_docs')   # the site's folder, made afresh
    start = time.time()
    ps = build(p.parse_args().out.resolve())
    print(f"{len(ps)} pages in {time.time() - start:.1f} s")
