"""Kubeflow delivery: `blueprint submit` and `blueprint schedule` (filled in by the Kubeflow-delivery work)."""
from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction, compile_parser: argparse.ArgumentParser) -> None:
    """Register the Kubeflow subcommands on the CLI (and cluster flags on `compile`)."""
