"""Make ``tune run recipes/<name>.py`` import the ``recipes/`` folder of the working directory.

torchtune's wheel installs a top-level package named ``recipes`` whose ``__init__`` raises, and
``tune run recipes/x.py`` imports the module ``recipes.x`` after *appending* the working
directory to ``sys.path``, so torchtune's package always wins. Installing this project puts
this file into site-packages (as ``recursive_distill_recipes.py``) together with a ``.pth`` file
that imports it at interpreter start. It resolves the one top-level name ``recipes`` to
``./recipes`` when the working directory has such a folder, which is what ``tune run`` means
by a recipe path, and leaves every other import alone.

It also quiets one known, harmless line: torchao 0.15 (the newest torchtune 0.6.1 imports)
logs "Skipping import of cpp extensions due to incompatible torch version ..." on every import
with torch 2.13. Its C++ kernels are optional; this library's QAT and export use none of them.
Only that message is dropped, and only that logger's.
"""

import importlib.machinery
import logging
import os
import sys


class WorkingDirRecipesFinder:
    """A meta-path finder that answers only for the top-level module ``recipes``."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "recipes" or path is not None:
            return None
        try:
            cwd = os.getcwd()
        except OSError:  # the working directory was deleted
            return None
        if not os.path.isdir(os.path.join(cwd, "recipes")):
            return None
        return importlib.machinery.PathFinder.find_spec(name, [cwd])


def _not_torchao_version_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Skipping import of cpp extensions due to incompatible torch version")


def install() -> None:
    if not any(finder is WorkingDirRecipesFinder for finder in sys.meta_path):
        sys.meta_path.insert(0, WorkingDirRecipesFinder)
    torchao = logging.getLogger("torchao")
    if _not_torchao_version_notice not in torchao.filters:
        torchao.addFilter(_not_torchao_version_notice)


install()
