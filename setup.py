"Package metadata comes from settings.ini, as in every nbdev 2 project."
from configparser import ConfigParser
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']
req = lambda key: cfg.get(key, '').split()

setuptools.setup(
    name=cfg['lib_name'], version=cfg['version'], description=cfg['description'],
    author=cfg['author'], author_email=cfg['author_email'], license='Apache-2.0',
    keywords=cfg['keywords'], url=cfg['git_url'], python_requires=f">={cfg['min_python']}",
    long_description=open('README.md', encoding='utf-8').read(), long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['fsmtl', 'fsmtl.*']), include_package_data=True,
    install_requires=req('requirements'),
    extras_require={k: req(f'{k}_requirements') for k in ('dev', 'wandb', 'optim', 'tensorboard')},
    entry_points={'console_scripts': req('console_scripts')},
    zip_safe=False)
