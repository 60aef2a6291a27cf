"""The demo of `make demo`: train on the embedded dataset, predict, print where things are."""

from unetseg.cli.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
