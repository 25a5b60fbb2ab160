"""Differential fuzzing of the label-map record decoder (see fuzz_decoder.py and the README's "Fuzzing")."""
