"""Compile, deploy, run and measure models; memory budgets."""
