"""Attacks: one file per attack, ``<name>_attack.py``, each defining an :class:`utils.attack.Attack` subclass registered with ``@register_attack``, and a thin ``main``."""
