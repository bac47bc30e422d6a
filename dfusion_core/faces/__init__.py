"""Faces beside cli.py: subcommand groups it registers (training_cli: train-on-policy, pair-signal)."""
