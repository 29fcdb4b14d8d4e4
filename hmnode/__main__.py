"""`python -m hmnode` is the `hmnode` command."""

from hmnode.cli.main import main

main(prog_name="hmnode")
