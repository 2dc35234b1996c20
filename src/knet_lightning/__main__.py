"""``python -m knet_lightning`` runs the Hydra app."""

from knet_lightning.cli import main

if __name__ == "__main__":
    main()
