"""`earful train`: a listening or units LM per a YAML recipe."""

from __future__ import annotations

from typing import Annotated

from ._parser import Arg, verb


@verb("train")
def train_cmd(recipe: str, *, out: str, set: Annotated[list[str], Arg(metavar="KEY=VALUE")] | None = None, resume: bool = False) -> None:
    """Train a listening or units LM per a YAML recipe; OUT becomes a save_pretrained model folder.

    --set section.key=value overrides the recipe (e.g. --set train.max_steps=3 data.train=M.jsonl).
    --resume continues from the latest OUT/checkpoints/ folder exactly where it stopped, on any
    number of processes. Under `torchrun --nproc_per_node N -m earful train ...` the ranks share
    each batch (train.parallel: ddp, or fsdp to shard the model); rank 0 writes logs and the model.

    Args:
        recipe: YAML recipe (see recipes/)
        out: output folder: the trained model, logs, checkpoints
        set: override recipe fields
        resume: continue from the latest checkpoint in OUT/checkpoints/ (any world size)
    """
    from ..train.recipe import load_recipe

    loaded = load_recipe(recipe, set or [])  # every problem in the recipe is reported before anything loads
    from ..eval.asr import generate_text
    from ..eval.text_ability import regression, text_ability
    from ..train.trainer import Hooks, train

    # The trainer defines no evaluation of its own: the text-ability gate and the logged eval answers are eval's.
    summary = train(loaded, out, resume=resume, hooks=Hooks(text_ability=text_ability, text_regression=regression, generate_text=generate_text))
    if summary.get("rank", 0) != 0:
        return
    print(f"trained {summary['steps']} steps in {summary['train_seconds']:.0f} s "
          f"(final loss {summary['final_loss']:.4f}, eval loss {summary['eval_loss'] if summary['eval_loss'] is None else round(summary['eval_loss'], 4)}); model saved to {out}")
