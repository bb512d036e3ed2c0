"""FT: fine-tune the backdoored model on a small clean subset (BackdoorBench's baseline defense;
default 5% of the training set, class-balanced)."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # noqa: E702

from utils.config import run_main
from utils.defense import Defense, DefenseResult, register_defense


@register_defense
class FineTuning(Defense):
    """Fine-tuning (FT): retrain the record's model on a clean, class-balanced subset."""
    name = 'ft'
    default_ratio = 0.05

    def defend(self, ctx):
        rows = ctx.finetune(desc='ft')
        return DefenseResult(ctx.model, summary={'finetune_seconds': sum(r['seconds'] for r in rows)})


def main(argv=None):
    return FineTuning().run(__file__, argv)


if __name__ == '__main__':
    sys.exit(run_main(main))
