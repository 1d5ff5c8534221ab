"""Offline work on recorded traces: replay through the live pipeline, rank candidate twins, sample traces."""
