"""One registry per family (attacks, defenses): name -> class. Classes register themselves with
the family's decorator; a name not registered yet is looked up by the file-name convention of its
family (``attack/<name>_attack.py``; ``defense/<name>.py`` or ``defense/<name>/<name>.py``), so
listing the names needs no import and getting one imports only its own module."""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Callable, Generic, TypeVar

from . import REPO_ROOT, UserError

T = TypeVar('T')


class Registry(Generic[T]):
    def __init__(self, family: str, folder: str, patterns: tuple[str, ...]):
        self.family = family
        self.folder = REPO_ROOT / folder
        self.patterns = patterns          # file paths relative to ``folder``, '{name}' filled in
        self.classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: register ``cls`` under its ``name`` attribute."""
        if not getattr(cls, 'name', ''):
            raise TypeError(f'{cls.__name__} needs a non-empty name to be registered as a {self.family}')
        self.classes[cls.name] = cls
        return cls

    def _file(self, name: str) -> Path | None:
        for pattern in self.patterns:
            path = self.folder / pattern.format(name=name)
            if path.is_file():
                return path
        return None

    def names(self) -> list[str]:
        """Every name with a file that follows the convention, and every registered name."""
        found = set(self.classes)
        for pattern in self.patterns:
            regex = re.compile(re.escape(pattern).replace(re.escape('{name}'), '([A-Za-z0-9][A-Za-z0-9_]*)', 1)
                               .replace(re.escape('{name}'), r'\1'))
            for path in self.folder.glob(pattern.replace('{name}', '*')):
                match = regex.fullmatch(path.relative_to(self.folder).as_posix())
                if match and self._file(match.group(1)) == path:
                    found.add(match.group(1))
        return sorted(found)

    def get(self, name: str) -> type[T]:
        if name not in self.classes:
            path = self._file(name) if name and '/' not in name and not name.startswith(('.', '_')) else None
            if path is not None:
                module = '.'.join(path.relative_to(REPO_ROOT).with_suffix('').parts)
                importlib.import_module(module)
            if name not in self.classes:
                raise UserError(f'unknown {self.family} {name!r} (known: {", ".join(self.names())})')
        return self.classes[name]

    def script(self, name: str) -> Path:
        """The command-line script of ``name`` (relative options resolve against its folder)."""
        self.get(name)
        return self._file(name) or self.folder / self.patterns[0].format(name=name)


ATTACKS: Registry = Registry('attack', 'attack', ('{name}_attack.py',))
DEFENSES: Registry = Registry('defense', 'defense', ('{name}.py', '{name}/{name}.py'))

register_attack: Callable = ATTACKS.register
register_defense: Callable = DEFENSES.register
