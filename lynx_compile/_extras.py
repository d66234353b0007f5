"""Optional libraries: the runtime needs torch only; tools and exporters import the rest here.

Every optional import goes through `require`, so a missing library names the pip extra
that installs it instead of ending in a bare ModuleNotFoundError.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional library is not installed; the message names the extra to install."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module` (dotted names allowed) for `feature`; raise MissingExtraError naming
    `lynx_compile[extra]` when its top-level package is not installed (other import errors
    propagate as they are)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        package = module.partition(".")[0]
        if err.name != package:
            raise  # the library is there, but a module of it or one of its dependencies is not
        raise MissingExtraError(
            f"{feature} needs {package}: pip install 'lynx_compile[{extra}]'", name=package
        ) from err
