"""The `hmnode` command line."""
