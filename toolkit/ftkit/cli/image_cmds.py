"""Placeholder until the commands land."""

COMMANDS: list = []
