"""``python train_<method>.py --help`` in about a second: the help without importing torch.

The help text comes from the real parser (``engine.cli.build_parser``), which needs only the method class's
attributes and ``add_arguments``; but a method script imports torch, torchvision and numpy at its top, and
importing them costs seconds. When the command line asks for help, :func:`install` puts stand-in modules for
those libraries in front of the import system (as Sphinx's ``autodoc_mock_imports`` does to document code
without its dependencies), so the script's imports, class definitions and ``main()`` run as written up to
the parser, which prints the help and exits. Nothing is trained or computed under the stand-ins.

Should anything else happen under them (a script that does real tensor work at import time), the
process starts again with the real libraries (``OKD_NO_FAST_HELP=1``) and prints the same help, slowly.
``tests/test_cli.py`` checks, for every script, that the fast help equals the real parser's help and that
torch is not imported.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The heavy libraries of the scripts' import-time code; everything else is imported for real.
MOCKED = ("torch", "torchvision", "numpy", "PIL", "tqdm", "scipy", "matplotlib")
ENV_OFF = "OKD_NO_FAST_HELP"


class Stub:
    """Stands for any object of a mocked library: every attribute, call, index and subclass is a Stub, so
    ``class Net(nn.Module)``, ``@torch.no_grad()``, ``torch.float32`` and ``Optional[torch.Tensor]``
    all work at import time."""

    def __init__(self, *args, **kwargs):
        pass

    def __mro_entries__(self, bases):          # class Net(nn.Module): Net subclasses a fresh Stub class
        return (type("Stub", (Stub,), {}),)

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return Stub()

    def __call__(self, *args, **kwargs):
        return Stub()

    def __getitem__(self, key):
        return Stub()

    def __iter__(self):
        return iter(())

    def __or__(self, other):                   # torch.Tensor | None
        return Stub()

    __ror__ = __or__


class _StubModule(types.ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self.__path__ = []                      # a package: submodules import too
        self.__version__ = "0"

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return Stub()


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in MOCKED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        pass


def help_requested(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def _main_script_in_repo() -> bool:
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    try:
        return main is not None and Path(main).resolve().is_relative_to(REPO)
    except (OSError, ValueError):
        return False


def _start_again_with_the_real_libraries(kind, value, tb) -> None:
    """An error under the stand-ins: run the same command again with the real libraries."""
    if kind in (SystemExit, KeyboardInterrupt):
        return sys.__excepthook__(kind, value, tb)
    sys.stdout.flush()
    os.environ[ENV_OFF] = "1"
    os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:] if hasattr(sys, "orig_argv")
             else [sys.executable] + sys.argv)


def install() -> bool:
    """Put the stand-ins in place if this process is a repository script asked for ``--help`` and none of
    the mocked libraries is loaded yet (a test or a notebook that imported torch keeps the real ones).
    Returns whether they were installed."""
    if (os.environ.get(ENV_OFF) or not help_requested(sys.argv[1:]) or not _main_script_in_repo()
            or any(name.split(".")[0] in MOCKED for name in sys.modules)):
        return False
    sys.meta_path.insert(0, _StubFinder())
    sys.excepthook = _start_again_with_the_real_libraries
    return True
