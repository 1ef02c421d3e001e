"""Write the confirmatory protocol of the lesson's claims from a pilot run (#26, step 2):

    python scripts/draft_claims_protocol.py results/cpu-2core-x86_64/claims-pilot/results.json \
        protocols/claims-pilot.toml protocols/claims-confirmation.toml --seed-offset 5000

Each row's seed count is sized from the pilot's spread (``compare.experiments.claims.protocol.draft``);
the design, the datasets and the minimum effects are the pilot protocol's. It prints what the counts
were derived from. Commit the protocol before running it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from compare.experiments.claims import protocol

BUDGET_CPU_S = 2 * 3600 * 0.85  # 60 minutes on 2 cores, 15% left for start-up, compilation and the report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pilot", type=Path, help="the pilot's results.json")
    parser.add_argument("template", type=Path, help="the pilot's protocol (design, datasets, minimum effects)")
    parser.add_argument("out", type=Path, help="the confirmatory protocol to write")
    parser.add_argument("--seed-offset", type=int, required=True, help="the first seed, never used before")
    parser.add_argument("--name", default="claims confirmation")
    parser.add_argument("--budget-cpu-s", type=float, default=BUDGET_CPU_S)
    args = parser.parse_args()
    raw = args.pilot.read_bytes()
    text, derived = protocol.draft(
        json.loads(raw), args.template.read_text(), name=args.name, seed_offset=args.seed_offset,
        pilot_path=args.pilot.as_posix(), pilot_sha256=hashlib.sha256(raw).hexdigest(), budget_cpu_s=args.budget_cpu_s,
    )  # fmt: skip
    protocol.parse(text)  # it reads back
    args.out.write_text(text)
    print(f"k = {derived['k']}, level {derived['level']:.5f}, cap {derived['cap']} seeds, "
          f"estimated CPU {derived['cpu_s'] / 60:.1f} min, seeds per framework {derived['counts']}")  # fmt: skip
    for (row, ds, regime), v in derived["need"].items():
        print(f"  {row} {ds} {regime or ''}: sd {v['sd']:.4g} (upper {v['sd_upper']:.4g}), needs {v['seeds']},"
              f" runs {v['seeds_run']}, power {v['power']:.2f}")  # fmt: skip
    print("costs (CPU s per seed):", {k: round(v, 1) for k, v in derived["costs"].items()})


if __name__ == "__main__":
    main()
