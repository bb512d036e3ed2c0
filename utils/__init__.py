"""The toolkit's shared library: config, data, poisoning, training, evaluation, records, pruning."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2, nothing written."""
