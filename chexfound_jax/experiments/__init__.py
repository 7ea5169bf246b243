"""Experiments built from the library: each a resumable command that writes its results and a report."""
