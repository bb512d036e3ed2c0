"""Attacks: one file per attack, ``<name>_attack.py``, each defining ``ATTACK`` and a thin ``main``."""
