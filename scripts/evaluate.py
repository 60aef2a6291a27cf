"""Score predicted masks against ground truth: `python scripts/evaluate.py PRED GT` (same as `unetseg-evaluate`)."""

from unetseg.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
