"""Synthetic sample generation speed: seconds per NIAH prompt, against the training-mix budget.

    python -m benchmarks.synthetic_speed [--length 2048] [--samples 500] [--budget 0.05]

A training mix draws a synthetic prompt per document on the host while the device trains, so a
prompt must cost well under a train step: the budget is 50 ms per 2048-token prompt (byte
tokenizer, depths cycling over 0.0–1.0). Prints one line; exits 1 when over the budget.
(Moved out of tests/test_evals_synthetic.py: wall-clock bounds do not belong in a test suite that
runs on loaded CI machines.)
"""

from __future__ import annotations

import argparse
import sys
import time

from text import niah_sample, passkey_sample
from text.tokenizer import ByteTokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=2048, help="prompt tokens")
    parser.add_argument("--samples", type=int, default=500, help="prompts to time")
    parser.add_argument("--budget", type=float, default=0.05, help="seconds per prompt allowed")
    args = parser.parse_args(argv)
    tok = ByteTokenizer()
    passkey_sample(tok, args.length, 0.5, rng=0)  # warm the token-stream cache: steady state, not first use
    t0 = time.perf_counter()
    for i in range(args.samples):
        niah_sample(tok, args.length, (i % 11) / 10, rng=i)
    per = (time.perf_counter() - t0) / args.samples
    ok = per < args.budget
    print(f"niah_sample at {args.length} tokens: {per * 1e3:.2f} ms per prompt over {args.samples} prompts "
          f"(budget {args.budget * 1e3:.0f} ms: {'within' if ok else 'OVER'})")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
