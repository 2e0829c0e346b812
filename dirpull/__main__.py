"""`python -m dirpull …`: the `dirpull` command, for an environment where its script is not on PATH."""

from dirpull.cli import main

main()
