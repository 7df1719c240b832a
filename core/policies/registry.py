"""Policy registries by discovery: a policy is the module of its name in a package
(`core.policies.<name>`, `runtime.kv.<name>`, `simulator.policies.<name>`), imported when the
name is first asked for, or a `policy.plugin` package that enters itself. No list of names is
written anywhere: the known ones are whatever the package's modules register
(docs/policies.md, "Adding a policy")."""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Iterator, Mapping

from core.errors import ConfigError


class Registry(Mapping):
    """name -> class. A name not entered yet is looked up as the module `<package>.<name>`;
    listing (iteration, len) imports every module of the package once. Modules enter their
    class with `add` (the halves' decorators: `declare`, `register`, `twin`)."""

    def __init__(self, package: str):
        self.package = package
        self._entries: dict[str, type] = {}
        self._listed = False

    def add(self, name: str, cls: type) -> type:
        self._entries[name] = cls
        return cls

    def _find(self, name) -> None:
        """Import `<package>.<name>` if such a module exists (it enters itself)."""
        if not isinstance(name, str) or not name.isidentifier() or name in self._entries:
            return
        if importlib.util.find_spec(f"{self.package}.{name}") is not None:
            importlib.import_module(f"{self.package}.{name}")

    def _list(self) -> None:
        if not self._listed:
            self._listed = True
            pkg = importlib.import_module(self.package)
            for m in pkgutil.iter_modules(pkg.__path__):
                if not m.ispkg and not m.name.startswith("_"):
                    importlib.import_module(f"{self.package}.{m.name}")

    def __getitem__(self, name: str) -> type:
        self._find(name)
        return self._entries[name]

    def __contains__(self, name) -> bool:
        self._find(name)
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._list()
        return iter(dict(self._entries))

    def __len__(self) -> int:
        self._list()
        return len(self._entries)

    def lookup(self, name) -> type:
        """The class of `name`, or the one-line ConfigError naming the known policies."""
        if name not in self:
            raise ConfigError(f"policy={name!r} is not known; choose one of: {', '.join(sorted(self))}")
        return self._entries[name]
