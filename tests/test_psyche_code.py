"""matsim against Psyche's own code, compiled or run where a checkout is given
($MATSIM_PSYCHE, tests/psyche.py); skipped, saying why, where it is not."""
import ast
import random
import re
import shutil
import subprocess

import pytest

from sim.assignment import deterministic_shuffle
from tests.psyche import source


def test_the_data_shuffle_is_psyches_deterministic_shuffle_for_any_seed(tmp_path):
    """Psyche's lcg.rs and deterministic_shuffle.rs compiled as they are (their test modules
    left out), run on 200 seeds and lists of 0..40 items, against sim.assignment."""
    if not shutil.which("rustc"):
        pytest.skip("needs rustc to compile Psyche's shuffle")
    lcg = source("shared/core/src/lcg.rs").read_text()
    shuffle = source("shared/core/src/deterministic_shuffle.rs").read_text()
    without_tests = lambda text: re.split(r"#\[cfg\(test\)\]", text)[0]   # noqa: E731
    rng = random.Random(0)
    cases = [(rng.randrange(2**64), rng.randrange(41)) for _ in range(200)]
    main = "fn main() {\n" + "".join(
        f"    let mut v: Vec<u32> = (0..{n}).collect(); deterministic_shuffle(&mut v, {seed}u64); "
        f"println!(\"{{:?}}\", v);\n" for seed, n in cases) + "}\n"
    program = (f"mod lcg {{ {without_tests(lcg)} }}\n" + without_tests(shuffle).replace("use crate::lcg::LCG;",
                                                                                     "use lcg::LCG;") + main)
    (tmp_path / "main.rs").write_text(program)
    subprocess.run(["rustc", "-O", "-o", str(tmp_path / "shuffle"), str(tmp_path / "main.rs")], check=True,
                   capture_output=True, timeout=600)
    printed = subprocess.run([str(tmp_path / "shuffle")], check=True, capture_output=True, text=True,
                             timeout=60).stdout.splitlines()
    for (seed, n), line in zip(cases, printed, strict=True):
        assert deterministic_shuffle(range(n), seed) == ast.literal_eval(line), (seed, n)
