"Cross-domain tests: one backbone scored on the test episodes of several domains, in one table."
from __future__ import annotations
import dataclasses
import re
from pathlib import Path

import numpy as np
from fastai.learner import Learner
from fastai.torch_core import default_device

from .checkpoint import backbone_from_checkpoint, read_checkpoint
from .config import DataConfig, TestConfig, device_of, option_values
from .data.benchmarks import get_benchmark, same_classes
from .data.block import FINAL_SHOTS, episode_dl
from .data.core import SPLITS, FewShotSplits, InputSpec, Split
from .data.tasks import check_task_size, shot_counts
from .data.torchvision_domains import DatasetItems, empty_split
from .evaluate import evaluate
from .features import model_device
from .probe import get_probe
from .runlog import write_json

__all__ = ['BSCD', 'DomainResults', 'domain_splits', 'evaluate_domains', 'evaluate_checkpoint_domains', 'add_domain_flags',
           'wants_domains']

# the settings of BSCD-FSL (Guo et al. 2020), the cross-domain benchmark of CropDisease, EuroSAT, ISIC and ChestX
BSCD = dict(ways=5, shots=(5, 20, 50), queries=15, episodes=600)


def _all_in_test(splits: FewShotSplits) -> FewShotSplits:
    "`splits` with the classes of all three splits in the test split."
    parts = [splits[s] for s in SPLITS if len(splits[s])]
    items = [p.items for p in parts]
    if all(p.in_memory for p in parts): items = np.concatenate(items)
    elif all(isinstance(i, DatasetItems) and i.datasets is items[0].datasets for i in items):
        items = DatasetItems(items[0].datasets, np.concatenate([i.index for i in items]))   # indices, not images
    else: items = [i for p in items for i in p]
    offsets = np.cumsum([0] + [p.n_classes for p in parts])
    test = Split(items, np.concatenate([p.labels + o for p, o in zip(parts, offsets)]), sum((p.classes for p in parts), []),
                 size=parts[0].size)
    side = test.image_size()
    return dataclasses.replace(splits, train=empty_split(side), val=empty_split(side), test=test,
                               meta={**splits.meta, 'split': 'test_only'})


def _name(domain): return domain.name if isinstance(domain, FewShotSplits) else str(domain)


def domain_splits(
    domain,             # a benchmark name, 'torchvision:NAME', 'folder:PATH', or `FewShotSplits`
    root='~/data',      # folder of the data folders (the root of torchvision's datasets)
    own=None,           # the benchmark the backbone was trained on: its test classes are kept apart
    split=None,         # 'test': the benchmark's test classes; 'test_only': all its classes; None: 'test' for `own`
    download=False,     # download missing files (torchvision's datasets by torchvision)
    model_input: InputSpec | None = None,  # the backbone's input; None: the domain's own
) -> FewShotSplits:
    "The test classes of `domain`, its images as the backbone takes them."
    split = split or ('test' if same_classes(_name(domain), own) else 'test_only')
    if split not in ('test', 'test_only'): raise ValueError(f"split must be 'test' or 'test_only', not {split!r}")
    tv = isinstance(domain, str) and domain.lower().startswith('torchvision:')
    kwargs = dict(split='test_only' if split == 'test_only' else 'ratios') if tv else {}
    if model_input and (tv or _name(domain).lower().startswith('folder:')): kwargs['size'] = model_input.image_size
    splits = domain if isinstance(domain, FewShotSplits) else get_benchmark(domain, root=root, download=download, **kwargs)
    if split == 'test_only' and not tv: splits = _all_in_test(splits)
    return splits.with_input(model_input) if model_input else splits


class DomainResults(dict):
    "`EvalResults` by domain, shown as one table."
    def __init__(self,
                 results,   # domain -> its `EvalResults`
                 classes):  # domain -> the number of its test classes
        super().__init__(results)
        self.classes = classes

    def table(self) -> str:
        "A markdown table: one row per domain, mean ± 95% CI per shot count."
        shots = sorted({s for r in self.values() for s in r})
        first = next(iter(self.values()))
        r0 = next(iter(first.values()))
        head = f"| domain | classes | " + ' | '.join(f'{s}-shot' for s in shots) + ' |'
        rows = [f"| {d} | {self.classes[d]} | " + ' | '.join(repr(r[s]) if s in r else '' for s in shots) + ' |'
                for d, r in self.items()]
        note = f"{r0.ways}-way, {r0.queries} queries a class, {r0.episodes} episodes; accuracy, mean ± 95% CI"
        return '\n'.join([head, '|' + '---|' * (len(shots) + 2), *rows, '', note])

    def __repr__(self): return self.table()

    def to_dict(self, domain  # one of the domains
                ) -> dict:
        "The results of `domain` as JSON takes them."
        r = self[domain]
        some = next(iter(r.values()))
        return dict(domain=domain, classes=self.classes[domain], ways=some.ways, queries=some.queries,
                    episodes=some.episodes, **{f'{s}shot': dict(mean=v.mean, ci95=v.ci95) for s, v in r.items()})

    def save(self, folder):  # where to write: test_<domain>.json each, test_domains.md and test_domains.json
        "Write the table and each domain's results to `folder`."
        folder = Path(folder)
        for d in self: write_json(self.to_dict(d), folder / f"test_{re.sub(r'[^A-Za-z0-9.]+', '-', d).strip('-')}.json")
        write_json([self.to_dict(d) for d in self], folder / 'test_domains.json')
        (folder / 'test_domains.md').write_text(self.table() + '\n')


def _loaded_at(spec: InputSpec, size: int) -> InputSpec:
    "`spec` with its images loaded at `size`: still resized to its model's side if it was, else taken at `size`."
    return dataclasses.replace(spec, image_size=size, **({} if spec.resized else dict(size=size)))


def _learner_input(learn) -> tuple:
    "The backbone of a `Learner` or model, the input it takes and the benchmark it learnt from."
    if not isinstance(learn, Learner): return learn, None, None
    return learn.model, learn.dls.splits.input, learn.dls.splits.name


def evaluate_domains(
    learn_or_checkpoint,       # a `Learner`, a checkpoint file or run folder, or a backbone (then give `model_input`)
    domains,                   # benchmark names, 'torchvision:NAME', 'folder:PATH', or `FewShotSplits`
    root='~/data',             # folder of the data folders
    ways: int = 5,             # classes per episode
    shots=FINAL_SHOTS,         # shot counts, all scored on the same episodes
    queries: int = 15,         # query images per class
    episodes: int = 2000,      # episodes per domain
    bscd: bool = False,        # BSCD-FSL's settings instead: 5-way, 5/20/50 shots, 15 queries, 600 episodes
    split=None,                # 'test_only': all classes of each domain; 'test': its test classes; None: all but for its own
    probe='logistic',          # the probe on the features: 'logistic' (= 'l2'), 'sklearn', 'proto', or a probe
    seed: int = 0,             # fixes the episodes
    download: bool = False,    # download missing files
    model_input: InputSpec | None = None,  # a backbone's input; None: the learner's or the checkpoint's
    device=None,               # where to run; None: the model's, or fastai's default for a checkpoint
    num_workers=None,          # loader processes; None: 0 for in-memory data, else all cores
    progress: bool = True,     # show progress bars
    out=None,                  # a folder to write the table and JSON to; None: write nothing
) -> DomainResults:
    "Test one backbone on the test episodes of each of `domains`: one table of mean ± 95% CI."
    if isinstance(domains, str): domains = [domains]
    if bscd: ways, shots, queries, episodes = BSCD['ways'], BSCD['shots'], BSCD['queries'], BSCD['episodes']
    if isinstance(learn_or_checkpoint, (str, Path)):
        p = Path(learn_or_checkpoint).expanduser()
        st = read_checkpoint(p, prefer='best')
        model, own = backbone_from_checkpoint(st, p), (st.get('config') or {}).get('dataset')
        model_input = model_input or InputSpec.from_state(st)
    else:
        model, learnt, own = _learner_input(learn_or_checkpoint)
        model_input = model_input or learnt
    counts = shot_counts(shots)
    # every domain is read and checked before any is scored
    data = {_name(d): domain_splits(d, root, own, split, download, model_input) for d in domains}
    for d, s in data.items(): check_task_size(s.test, ways, counts[-1] + queries, 'test', d)
    if device is not None or isinstance(learn_or_checkpoint, (str, Path)): model = model.to(device or default_device())
    results = {}
    for d, s in data.items():
        dl = episode_dl(s, 'test', ways, counts[-1], queries, episodes, seed=seed, device=model_device(model),
                        num_workers=num_workers)
        results[d] = evaluate(model, dl, shots=counts, probe=probe, progress=progress)
    res = DomainResults(results, {d: s.test.n_classes for d, s in data.items()})
    if out is not None: res.save(out)
    return res


def evaluate_checkpoint_domains(
    load_path,           # a checkpoint file or a run folder
    datasets=None,       # the domains: benchmark names, 'torchvision:NAME' or 'folder:PATH'; None: the run's own
    bscd=False,          # BSCD-FSL's settings
    split=None,          # 'test' or 'test_only' (see `evaluate_domains`)
    download=False,      # download missing files
    **options,           # the test options (`TEST_OPTIONS`): root, gpu, seed, test_ways, test_queries, test_method ...
) -> DomainResults:      # by domain, shown as one table
    "`fsmtl test` on several domains: the run's test options, the table written to the run folder."
    st = read_checkpoint(load_path, prefer='best')
    values = option_values(options, st.get('config'))
    data, test = DataConfig.of(values), TestConfig.of(values)
    if test.test_method == 'native':
        raise ValueError("a cross-domain test fits a probe on the features: use --test_method l2, sklearn or proto")
    p = Path(load_path).expanduser()
    return evaluate_domains(p, datasets or [data.dataset], root=data.root, ways=test.test_ways,
                            shots=[*FINAL_SHOTS, test.test_shots], queries=test.test_queries, episodes=test.test_episodes,
                            bscd=bscd, split=split, probe=get_probe(test.test_method, test.test_l2), seed=data.seed,
                            download=download, device=device_of(values['gpu']), num_workers=data.num_workers,
                            progress=values['progress'],
                            model_input=_loaded_at(InputSpec.from_state(st), data.size) if options.get('size') else None,
                            out=p if p.is_dir() else p.parent)


def add_domain_flags(p):  # the `fsmtl test` parser
    "The flags of `fsmtl test` that choose the domains and their settings."
    p.add_argument('--dataset', action='append', metavar='DOMAIN',
                   help="a benchmark, torchvision:NAME (e.g. torchvision:EuroSAT) or folder:PATH; give it several "
                        "times for one table over several domains (default: the run's own)")
    p.add_argument('--bscd', action='store_true', help="BSCD-FSL's settings: 5-way, 5/20/50 shots, 15 queries, 600 episodes")
    p.add_argument('--split', choices=['test', 'test_only'],
                   help="test: a domain's test classes; test_only: all its classes (default for a domain not the run's own)")
    p.add_argument('--download', action='store_true', help='download missing files (torchvision datasets by torchvision)')


def wants_domains(args  # the parsed arguments of `fsmtl test`
                  ) -> bool:
    "Whether `fsmtl test`'s arguments ask for the cross-domain table rather than the run's own test."
    ds = args.dataset or []
    return len(ds) > 1 or args.bscd or args.split is not None or any(':' in d for d in ds)
