"""Run mutmut 3 so that the tests import the MUTATED sources.

setup.py maps the folders model/, train/, ... to medvlm3d.model, medvlm3d.train, ... and the
editable install resolves those names through a meta-path finder holding absolute paths into the
work tree, so under plain `mutmut run` every test would import the original files and every
mutant would survive. This wrapper points that finder at mutants/<folder> before mutmut starts
(forked test processes inherit it), and names each mutant by the module the tests import
(medvlm3d.train.losses, not train.losses: mutmut's trampolines check `__module__`). Usage: python bench/mutmut_run.py <mutmut args>, from the
repository root (bench/mutation.sh calls it). MUTMUT_TESTS="tests/a.py tests/b.py" replaces setup.cfg's
test selection for one run (one module's tests only: a shorter stats pass; each mutant still runs only
the tests that reach its function).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def redirect_editable_install(root: Path) -> int:
    """Point every medvlm3d.* mapping of the editable finder at root/mutants/...; returns how many."""
    n = 0
    for finder in sys.meta_path:
        mapping = getattr(sys.modules.get(getattr(finder, "__module__", ""), None), "MAPPING", None)
        if not isinstance(mapping, dict):
            continue
        src = Path(mapping["medvlm3d"]).resolve().parent
        for name, path in list(mapping.items()):
            if name.split(".")[0] == "medvlm3d" and Path(path).resolve().is_relative_to(src):
                mapping[name] = str(root / "mutants" / Path(path).resolve().relative_to(src))
                n += 1
    return n


def select_tests(paths: str) -> None:
    """Replace setup.cfg's pytest_add_cli_args_test_selection with the space-separated `paths`."""
    import mutmut.configuration as configuration

    configuration.config().pytest_add_cli_args_test_selection = paths.split()


def qualify_mutant_names() -> None:
    """mutmut derives a mutant's module from its file path (train/losses.py -> train.losses); the
    installed module is medvlm3d.train.losses: prefix the package so the two agree."""
    import mutmut.__main__ as main
    import mutmut.mutation.file_mutation as file_mutation
    import mutmut.utils.format_utils as format_utils

    plain = format_utils.get_mutant_name

    def qualified(relative_source_path: Path, mutant_method_name: str) -> str:
        name = plain(relative_source_path, mutant_method_name)
        return name if name.startswith("medvlm3d.") else f"medvlm3d.{name}"

    for module in (main, file_mutation, format_utils):
        module.get_mutant_name = qualified


if __name__ == "__main__":
    root = Path.cwd().resolve()
    if redirect_editable_install(root) == 0:
        sys.exit("bench/mutmut_run.py: no editable medvlm3d install found (pip install -e .)")
    qualify_mutant_names()
    if os.environ.get("MUTMUT_TESTS"):
        select_tests(os.environ["MUTMUT_TESTS"])
    from mutmut.__main__ import cli

    sys.argv[0] = "mutmut"
    cli()
