"""Compare U-Net skip variants with the SMP baseline: `python scripts/compare.py [--steps 400]`."""

from unetseg.comparison import main

if __name__ == "__main__":
    main()
