"""What Psyche's 1-bit signs do to embedding rows that never get a gradient.

    .venv/bin/python -m scripts.zero_blocks [--rounds 100]

tiny with a chain over 16 of its 64 tokens: the input-embedding rows of tokens 16-63 get
no gradient in any round. Under matsim's absent slot their DCT blocks send nothing and the
rows stay where they started; sent as Psyche sends them (zero_blocks "sent", 1-bit), each
all-zero block's top-k go out as +1 every round, and sign-SGD moves those rows by lr a
round. Prints, per mode, how far the unseen rows moved and the held-out loss, and writes
them to docs/data/zero_blocks.json (or --out) with the commit."""
import argparse
import dataclasses
import json
from pathlib import Path

from scripts import CHECKOUT
from sim.provenance import stamp

from sim.config import load_config
from sim.run import Network, simulate

EMBED, SEEN = "model.embed_tokens.weight", 16


def unseen_rows_moved(rounds: int) -> dict:
    """Per zero-blocks mode: how far the embedding rows of tokens no batch contains moved, and
    the held-out loss, after `rounds` rounds of tiny at tiers 0,1 under 1-bit signs."""
    base = load_config("tiny")
    base = base.replace(markov=dataclasses.replace(base.markov, states=SEEN),
                        distro=dataclasses.replace(base.distro, quantize_1bit=True))
    start = Network(base, [0, 1], seed=0, device="cpu").peers[0].model.state_dict()[EMBED][SEEN:].clone()
    rows = {}
    for mode in ("absent", "sent"):
        config = base.replace(distro=dataclasses.replace(base.distro, zero_blocks=mode))
        result = simulate(config, [0, 1], rounds=rounds, seed=0, device="cpu")
        moved = (result.final_weights[EMBED][SEEN:] - start).abs()
        rows[mode] = {"mean_moved": moved.mean().item(), "max_moved": moved.max().item(),
                      "moved_share": (moved > 0).float().mean().item(), "initial_scale": start.abs().mean().item(),
                      "final_loss": result.final_eval_loss}
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--out", type=Path, default=CHECKOUT / "docs" / "data" / "zero_blocks.json")
    args = parser.parse_args(argv)
    rows = unseen_rows_moved(args.rounds)
    print(f"tiny, tiers 0,1, {args.rounds} rounds, 1-bit, chain over tokens 0-{SEEN - 1} of "
          f"{load_config('tiny').model.vocab_size}")
    print(f"{'zero blocks':<12} {'unseen rows: mean |moved|':>26} {'max |moved|':>12} {'moved elements':>15} "
          f"{'final loss':>11}")
    for mode, row in rows.items():
        print(f"{mode:<12} {row['mean_moved']:>26.4f} {row['max_moved']:>12.4f} {row['moved_share']:>14.1%} "
              f"{row['final_loss']:>11.4f}")
    args.out.write_text(json.dumps({**stamp(), "rounds": args.rounds, "seen": SEEN,
                                    "vocab": load_config("tiny").model.vocab_size, "modes": rows},
                                   indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
