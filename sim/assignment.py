"""Which sequences each trainer trains in a round: Psyche's data assignment
(shared/coordinator/src/data_selection.rs, `assign_data_for_state`).

- The round's trainers are its clients: the peers present that round, in the order they
  joined, shuffled by Psyche's `deterministic_shuffle` (a Fisher-Yates walk driven by its
  LCG, shared/core/src/deterministic_shuffle.rs and lcg.rs) with the round's random seed.
- The round's global batch (`RunConfig.global_batch`, Psyche's ramp) is split over them:
  each gets total // n sequences and the first total % n of the shuffled order one more.
  A trainer with 0 is assigned nothing: it trains and sends nothing that round.
- Sequences are numbered by the data index: a round starts where the one before ended
  (`RunConfig.data_index`), so over a run no sequence is trained twice or skipped, and a
  sequence's tokens depend on its index alone (`sim.data.sequences`), not on who trains it.

Psyche's round seed comes from the coordinator's randomness; matsim derives it from the
run's seed and the round (`round_seed`), so a run stays a function of its seed.
"""
import hashlib
from collections.abc import Sequence

LCG_A, LCG_C = 6364136223846793005, 1442695040888963407
U64 = (1 << 64) - 1


def deterministic_shuffle(items: Sequence, seed: int) -> list:
    """Psyche's deterministic_shuffle: for i from the end, swap item i with item
    LCG.next() % (i + 1), the LCG's state starting at `seed` (wrapping u64 arithmetic)."""
    items, state = list(items), seed & U64
    for i in range(len(items) - 1, 0, -1):
        state = (state * LCG_A + LCG_C) & U64
        j = state % (i + 1)
        items[i], items[j] = items[j], items[i]
    return items


def round_seed(seed: int, round_: int) -> int:
    """The round's random seed (a u64), from the run's seed and the round."""
    return int.from_bytes(hashlib.sha256(repr(("round", seed, round_)).encode()).digest()[:8], "little")


def assign(trainers: Sequence[int], total: int, data_index: int, seed: int) -> dict[int, range]:
    """{trainer: the data indices it trains} for one round: `total` sequences from
    `data_index` on, split over `trainers` (in join order) shuffled by `seed`. Trainers
    assigned 0 sequences are left out."""
    order = deterministic_shuffle(trainers, seed)
    if not order:
        return {}
    base, extra = divmod(total, len(order))
    assigned, start = {}, data_index
    for i, trainer in enumerate(order):
        size = base + (1 if i < extra else 0)
        if size:
            assigned[trainer] = range(start, start + size)
            start += size
    return assigned
