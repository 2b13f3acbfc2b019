"""The pure settlement core: facts in, results out; no file, clock, database or network."""
