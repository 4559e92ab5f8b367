"The suite's own order: the longest files go first to the two workers, each file whole, in the order conftest sorts."
import re
from pathlib import Path
from types import SimpleNamespace

from conftest import LONGEST_FIRST, pytest_collection_modifyitems

TESTS = Path(__file__).parent


def test_the_longest_files_are_test_files_of_the_suite():
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    missing = [n for n in LONGEST_FIRST if not (TESTS / n).is_file()]
    assert not missing, f"renamed or gone: {missing}"


def test_collection_puts_the_longest_files_first_and_keeps_each_files_order():
    names = ['test_cli.py', LONGEST_FIRST[1], 'test_docs.py', LONGEST_FIRST[0], 'test_cli.py']
    items = [SimpleNamespace(path=TESTS / n, i=i) for i, n in enumerate(names)]
    pytest_collection_modifyitems(items)
    assert [(it.path.name, it.i) for it in items] == [(LONGEST_FIRST[0], 3), (LONGEST_FIRST[1], 1), ('test_cli.py', 0),
                                                      ('test_docs.py', 2), ('test_cli.py', 4)]


def test_make_keeps_files_whole_and_in_the_collected_order():
    "`--dist loadfile` alone sends files out by number of tests (xdist's `--loadscope-reorder`), which ignores the sort."
    flags = re.search(r'^PYTEST := (.*)$', (TESTS.parent / 'Makefile').read_text(), re.M).group(1).split()
    assert flags[flags.index('--dist') + 1] == 'loadfile' and '--no-loadscope-reorder' in flags
