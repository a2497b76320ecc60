"""Two names of the public API are also submodules: `prunekit.save` and `prunekit.compress`. Importing such a
submodule binds the package's attribute to the module, which would hide the function of the same name that
`import prunekit; prunekit.save(...)` means; so those two modules are made callable, calling their function."""

from __future__ import annotations

import sys
import types
from typing import Any, Callable


def call_as(module_name: str, function: Callable[..., Any]) -> None:
    """Make the module `module_name` callable: calling it calls `function`."""

    class _Module(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

    sys.modules[module_name].__class__ = _Module
