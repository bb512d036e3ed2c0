"""Defenses: ``feature.py`` (FMP), ``ft/ft.py`` and ``<name>/<name>.py`` for the rest; each defines
``DEFENSE`` (a :class:`utils.defense.Defense` subclass) and a thin ``main``."""
