"""``python -m experiments.vae``: train and evaluate a VAE (see :mod:`experiments.vae.cli`)."""

from experiments.vae.cli import main

if __name__ == "__main__":
    main()
