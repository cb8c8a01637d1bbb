"""The benchmark suite of issue 6: ``make bench`` (``python -m bench``); see bench/README.md."""
