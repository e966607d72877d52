"""``python -m experiments.ffn``: the waves run, the sweep, or retraining the shipped files (``--help``)."""
from .experiment import main

if __name__ == "__main__":
    main()
