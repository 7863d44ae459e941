"""``python -m deepwhale`` (and ``torchrun -m deepwhale train ...``): the command line."""

from deepwhale.cli import main

if __name__ == "__main__":
    main()
