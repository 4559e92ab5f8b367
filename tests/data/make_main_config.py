"""A finished run written by main's code (979c717): its config.json, last.pth and results. tests/test_config.py checks that
today's code reads its config.json into the typed configs with the same values, tests it and resumes it.
Made by `PYTHONPATH=<main at 979c717> python tests/data/make_main_config.py tests/data/main_run`."""
import shutil, sys, tempfile
from pathlib import Path
import torch
import fsmtl
from fsmtl.train import train
print('fsmtl from', fsmtl.__file__)
out, tmp = Path(sys.argv[1]), Path(tempfile.mkdtemp())
# a value off its default for each renamed option, and for an algorithm's own
train(dataset='glyphs-small', root='/tmp/fsmtl-data', log_dir=str(tmp), run_name='main', model_kwargs=dict(channels=(8, 8, 8, 8)),
      meta_batch_size=2, epoch_length=4, val_epoch_length=3, final_test_epoch_length=5, test_queries=3, max_epochs=1,
      optim='adam', weight_decay=1e-4, scheduler='one_cycle', lr=2e-3, norm_train_features=True, progress=False, seed=2)
out.mkdir(parents=True, exist_ok=True)
for f in ('config.json', 'results.json', 'history.csv', 'last.pth'): shutil.copy(tmp / 'main' / f, out / f)
# what main makes of it: its test by evaluate_checkpoint, and the run resumed for a second epoch
import json
from fsmtl.train import evaluate_checkpoint
test = evaluate_checkpoint(tmp / 'main' / 'last.pth', root='/tmp/fsmtl-data', progress=False)
resumed = train(resume=True, load_path=str(tmp / 'main'), max_epochs=2, progress=False)
json.dump(dict(test={s: r.accs.tolist() for s, r in test.items()}, resumed_test={s: r.accs.tolist() for s, r in resumed.test.items()},
               resumed_history=resumed.history.drop(columns='time', errors='ignore').to_dict('list')),
          open(out / 'expected.json', 'w'), indent=1)
