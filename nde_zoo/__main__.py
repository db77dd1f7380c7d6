"""``python -m nde_zoo``: the same as the ``nde-zoo`` console script."""

from nde_zoo.cli import main

if __name__ == "__main__":
    main()
