"""The model zoo: one module per family; importing this package registers every family.

Modules are discovered, so adding a family is adding a file (``layers`` holds shared blocks).
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "layers":
        importlib.import_module(f"{__name__}.{_module.name}")
