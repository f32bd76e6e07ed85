"""`make bench`: the project's performance figures, each against a baseline measured in
the same run. See bench/README.md."""
